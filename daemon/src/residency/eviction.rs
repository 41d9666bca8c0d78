//! Eviction: which idle models make room for a load.
//!
//! Least recently used first, only models that are idle (nothing running or queued) and not
//! pinned, and nothing at all when even evicting every candidate would not make the load fit.
//! Pure: a function of plain records, so the rule is tested without model files.

use std::time::SystemTime;

/// What a model is doing, as eviction sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Being loaded: its memory is promised.
    Loading,
    /// Pinned: never evicted.
    Pinned,
    /// Requests are running or queued.
    Busy,
    /// Evictable.
    Idle,
}

impl Holding {
    fn as_str(self) -> &'static str {
        match self {
            Holding::Loading => "loading",
            Holding::Pinned => "pinned",
            Holding::Busy => "busy",
            Holding::Idle => "idle",
        }
    }
}

/// A model that holds memory on the backend a load needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    /// Bytes counted against the budget: `max(estimate, measured)`.
    pub reserved: u64,
    pub holding: Holding,
    pub last_used: SystemTime,
}

/// Why a load cannot fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// Bytes that free memory plus every evictable model would give.
    pub available: u64,
    /// Who holds the memory: `"name N bytes (why)"`, comma-separated, or `"nothing"`.
    pub holders: String,
}

/// The models to evict, least recently used first, so that `needed` more bytes fit in
/// `budget` beside `holders`; empty when they fit already.
pub fn plan(holders: &[Holder], budget: u64, needed: u64) -> Result<Vec<String>, Shortfall> {
    let used: u64 = holders.iter().map(|h| h.reserved).sum();
    let free = budget.saturating_sub(used);
    if needed <= free {
        return Ok(Vec::new());
    }
    let mut candidates: Vec<&Holder> = holders
        .iter()
        .filter(|h| h.holding == Holding::Idle)
        .collect();
    candidates.sort_by_key(|h| h.last_used);
    let evictable: u64 = candidates.iter().map(|h| h.reserved).sum();
    let available = free.saturating_add(evictable);
    if needed > available {
        let holders = if holders.is_empty() {
            "nothing".into()
        } else {
            holders
                .iter()
                .map(|h| format!("{} {} bytes ({})", h.name, h.reserved, h.holding.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Shortfall { available, holders });
    }
    let mut freed = free;
    let mut victims = Vec::new();
    for candidate in candidates {
        if freed >= needed {
            break;
        }
        freed = freed.saturating_add(candidate.reserved);
        victims.push(candidate.name.clone());
    }
    Ok(victims)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn holder(name: &str, reserved: u64, holding: Holding, last_used_s: u64) -> Holder {
        Holder {
            name: name.into(),
            reserved,
            holding,
            last_used: UNIX_EPOCH + Duration::from_secs(last_used_s),
        }
    }

    #[test]
    fn a_load_that_fits_evicts_nothing() {
        let holders = [holder("a", 300, Holding::Idle, 1)];
        assert_eq!(plan(&holders, 1000, 700), Ok(vec![]));
        assert_eq!(plan(&[], 1000, 1000), Ok(vec![]));
    }

    #[test]
    fn least_recently_used_goes_first_and_only_as_many_as_needed() {
        let holders = [
            holder("newest", 200, Holding::Idle, 30),
            holder("oldest", 200, Holding::Idle, 10),
            holder("middle", 200, Holding::Idle, 20),
        ];
        // 400 free; 500 needed: one 200-byte model must go, the least recently used.
        assert_eq!(plan(&holders, 1000, 500), Ok(vec!["oldest".into()]));
        assert_eq!(
            plan(&holders, 1000, 700),
            Ok(vec!["oldest".into(), "middle".into()])
        );
    }

    #[test]
    fn pinned_busy_and_loading_models_are_never_evicted() {
        let holders = [
            holder("pinned", 300, Holding::Pinned, 1),
            holder("busy", 300, Holding::Busy, 2),
            holder("loading", 300, Holding::Loading, 3),
            holder("idle", 100, Holding::Idle, 4),
        ];
        // 0 free, 100 evictable.
        assert_eq!(plan(&holders, 1000, 100), Ok(vec!["idle".into()]));
        let err = plan(&holders, 1000, 101).unwrap_err();
        assert_eq!(err.available, 100);
        assert_eq!(
            err.holders,
            "pinned 300 bytes (pinned), busy 300 bytes (busy), loading 300 bytes (loading), \
             idle 100 bytes (idle)"
        );
    }

    #[test]
    fn an_impossible_load_evicts_nothing() {
        let holders = [
            holder("a", 400, Holding::Idle, 1),
            holder("b", 400, Holding::Idle, 2),
        ];
        // Even evicting both leaves 1000 < 1001: nothing is chosen.
        let err = plan(&holders, 1000, 1001).unwrap_err();
        assert_eq!(err.available, 1000);
        let nobody = plan(&[], 1000, 2000).unwrap_err();
        assert_eq!(nobody.holders, "nothing");
    }
}
