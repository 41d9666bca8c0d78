//! The step plan: which sequences, and which chunks of their prompts, go into the next pass.
//!
//! Every decoding sequence gets its one token first (so streams keep flowing), then prompt
//! chunks fill what is left of `batch_tokens`, oldest admission first (chunked prefill: a long
//! prompt never holds the device for more than one such pass). Pure: a function of what each
//! slot holds.

use std::time::Instant;

use egpu_engine::models::decoder::LogitsWanted;

/// What the planner needs to know of an occupied slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    pub slot: usize,
    pub admitted: Instant,
    /// Tokens to feed before the first prediction (a prompt, or a scored text minus its
    /// last token), and how many of them are in the cache.
    pub input_len: usize,
    pub fed: usize,
    /// A sampled token waits to be fed: the sequence decodes.
    pub decoding: bool,
    /// Every position's logits are wanted (scoring), not only the last one.
    pub wants_every_position: bool,
}

/// What one slot does in the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Feed the pending sampled token.
    Decode,
    /// Feed `input[from..from + len]`.
    Prefill { from: usize, len: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedSlot {
    pub slot: usize,
    pub work: Work,
    pub logits: LogitsWanted,
}

impl PlannedSlot {
    pub fn tokens(&self) -> usize {
        match self.work {
            Work::Decode => 1,
            Work::Prefill { len, .. } => len,
        }
    }
}

/// One pass: at most one entry per slot, in slot order (the order the backends take).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepPlan {
    pub slots: Vec<PlannedSlot>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn tokens(&self) -> usize {
        self.slots.iter().map(PlannedSlot::tokens).sum()
    }
}

/// Plans the next pass over the occupied slots, carrying at most `batch_tokens` tokens (and at
/// least the decode tokens, which the caller keeps within the budget by the slot count).
pub fn plan_step(slots: &[SlotView], batch_tokens: usize) -> StepPlan {
    let mut planned: Vec<PlannedSlot> = slots
        .iter()
        .filter(|s| s.decoding)
        .map(|s| PlannedSlot {
            slot: s.slot,
            work: Work::Decode,
            logits: LogitsWanted::Last,
        })
        .collect();
    let mut used = planned.len();
    let mut prefilling: Vec<&SlotView> = slots
        .iter()
        .filter(|s| !s.decoding && s.fed < s.input_len)
        .collect();
    prefilling.sort_by_key(|s| s.admitted);
    for s in prefilling {
        let left = batch_tokens.saturating_sub(used);
        if left == 0 {
            break;
        }
        let len = (s.input_len - s.fed).min(left);
        let last_chunk = s.fed + len == s.input_len;
        let logits = if s.wants_every_position {
            LogitsWanted::All
        } else if last_chunk {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        planned.push(PlannedSlot {
            slot: s.slot,
            work: Work::Prefill { from: s.fed, len },
            logits,
        });
        used += len;
    }
    planned.sort_by_key(|p| p.slot);
    StepPlan { slots: planned }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn view(
        slot: usize,
        admitted_ms: u64,
        input_len: usize,
        fed: usize,
        decoding: bool,
    ) -> SlotView {
        SlotView {
            slot,
            admitted: base() + Duration::from_millis(admitted_ms),
            input_len,
            fed,
            decoding,
            wants_every_position: false,
        }
    }

    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    fn prefill(slot: usize, from: usize, len: usize, logits: LogitsWanted) -> PlannedSlot {
        PlannedSlot {
            slot,
            work: Work::Prefill { from, len },
            logits,
        }
    }

    fn decode(slot: usize) -> PlannedSlot {
        PlannedSlot {
            slot,
            work: Work::Decode,
            logits: LogitsWanted::Last,
        }
    }

    #[test]
    fn a_long_prompt_is_cut_into_chunks_beside_decoding_streams() {
        // Slots 0 and 2 decode; slot 1 has a 300-token prompt; 128 tokens per pass.
        let mut slots = vec![
            view(0, 0, 10, 10, true),
            view(1, 5, 300, 0, false),
            view(2, 1, 12, 12, true),
        ];
        let mut chunks = Vec::new();
        loop {
            let plan = plan_step(&slots, 128);
            assert!(plan.tokens() <= 128);
            // The streams decode in every pass while the prompt is fed.
            assert_eq!(plan.slots[0], decode(0));
            assert_eq!(plan.slots[2], decode(2));
            let p = plan.slots[1];
            let Work::Prefill { from, len } = p.work else {
                panic!("slot 1 prefills: {p:?}")
            };
            chunks.push((from, len, p.logits));
            slots[1].fed += len;
            if slots[1].fed == 300 {
                break;
            }
        }
        assert_eq!(
            chunks,
            vec![
                (0, 126, LogitsWanted::None),
                (126, 126, LogitsWanted::None),
                (252, 48, LogitsWanted::Last),
            ]
        );
        // Then slot 1 decodes too.
        slots[1].decoding = true;
        assert_eq!(
            plan_step(&slots, 128).slots,
            vec![decode(0), decode(1), decode(2)]
        );
    }

    #[test]
    fn older_prompts_fill_the_pass_first() {
        let slots = [view(0, 30, 100, 0, false), view(1, 10, 100, 40, false)];
        let plan = plan_step(&slots, 128);
        // Slot 1 was admitted first: its remaining 60 tokens, then 68 of slot 0's.
        assert_eq!(
            plan.slots,
            vec![
                prefill(0, 0, 68, LogitsWanted::None),
                prefill(1, 40, 60, LogitsWanted::Last),
            ]
        );
        // A full budget leaves the younger prompt for the next pass.
        let plan = plan_step(&slots, 60);
        assert_eq!(plan.slots, vec![prefill(1, 40, 60, LogitsWanted::Last)]);
    }

    #[test]
    fn scoring_wants_every_position_of_every_chunk() {
        let mut score = view(3, 0, 200, 0, false);
        score.wants_every_position = true;
        let plan = plan_step(&[score], 128);
        assert_eq!(plan.slots, vec![prefill(3, 0, 128, LogitsWanted::All)]);
    }

    #[test]
    fn nothing_to_do_is_an_empty_plan() {
        assert!(plan_step(&[], 128).is_empty());
        // A sequence whose input is all fed and that has no token pending waits.
        assert!(plan_step(&[view(0, 0, 5, 5, false)], 128).is_empty());
    }
}
