//! Prompt-prefix reuse: which free slot a new sequence takes, and how much of that slot's
//! cache it keeps.
//!
//! A slot's KV cache outlives the sequence that filled it. The runner remembers, per slot,
//! exactly the tokens whose keys and values are in the cache ([`SlotHistory`]); a new request
//! whose input starts with some of them keeps that part and prefills only the rest. A chat
//! app that resends the whole conversation every turn finds its previous turn (prompt and
//! answer) still in the slot it used, and pays only for the new message.
//!
//! Why per slot, not a shared pool of cached blocks: slot caches are reserved in full when a
//! model loads (a model never needs more memory mid-request, the budget's guarantee), so a
//! prefix kept in a free slot costs no memory that is not already counted, and dropping it
//! would free none. The unit that frees memory under pressure stays a whole idle model,
//! evicted least recently used first, its cached prefixes with it.
//!
//! Between slots, a prefix is copied rather than shared: a new sequence whose input starts like
//! what another slot holds (busy or free: several conversations with one long system prompt)
//! gets those positions copied into its own slot (a memory copy on the CPU, a device copy on
//! tinygrad) instead of prefilling them. Sharing blocks copy-on-write would save the copy's
//! memory, but slots are reserved in full anyway, so it would save nothing the budget counts.
//! So a slot holding another conversation is never cut just to reuse the part of it the input
//! shares: the new sequence takes an empty or the least recently used slot and copies that part.
//!
//! Exactness (CPU backend): the engine's outputs for a token do not depend on how its sequence
//! was split into passes (batch invariance, ARCHITECTURE.md), so a reused prefix leaves the same
//! cache bits as prefilling it again, and the request gets the same logits. On tinygrad the
//! tokens are the same and the logits agree within a tolerance (its kernels differ per pass
//! shape).
//!
//! Pure: a function of the free slots' histories and the new input.

/// What a slot's cache holds now, for matching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotHistory {
    /// Every token whose keys and values are in the slot's cache, in order.
    pub tokens: Vec<u32>,
    /// When the slot was last fed (a step counter; larger is more recent).
    pub last_used: u64,
    /// The input length (prompt) of the sequence that last took the slot: `tokens` starts
    /// with that prompt, then holds what was generated after it.
    pub prompt_len: usize,
}

impl SlotHistory {
    /// Forgets everything past `len` tokens (the cache is cut to match).
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }
}

/// Where a new sequence goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotChoice {
    pub slot: usize,
    /// Tokens of the input that are not fed again: already in that slot's cache, or copied
    /// into it from `copy_from`.
    pub reused: usize,
    /// Another slot whose first `reused` positions are to be copied into `slot` first.
    pub copy_from: Option<usize>,
}

/// Tokens `a` and `b` share from the start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Picks a free slot for `input` among `free` (indices into `histories`; never empty).
///
/// - The slot sharing the longest prefix with the input is taken when it loses nothing (the
///   input extends all it holds), or when it keeps the whole prompt of the sequence that
///   filled it (the same conversation resumed after the template dropped part of the last
///   answer, e.g. a reasoning block stripped from earlier turns).
/// - Otherwise the free slot with the least to lose: an empty one, else the least recently used
///   (whatever it shares with the input is still kept).
/// - Then any other slot, busy or free, holding a longer prefix of the input lends it: its
///   positions are copied into the chosen slot (`copy_from`). A 20-token system prompt in
///   common is not worth destroying a 1,500-token conversation another app will resume, and
///   with the copy not even a 1,000-token one is.
///
/// `reusable` caps what may be kept: a sequence must feed at least its last input token to get
/// the logits it predicts from, and a scoring wants every position's logits (cap 0).
pub fn choose_slot(
    histories: &[SlotHistory],
    free: &[usize],
    input: &[u32],
    reusable: usize,
) -> SlotChoice {
    let shared = |slot: usize| common_prefix(&histories[slot].tokens, input).min(reusable);
    let best = free
        .iter()
        .map(|&slot| (slot, shared(slot)))
        // Longest match; among equals, the slot that loses least, then the lowest index.
        .max_by_key(|&(slot, keep)| {
            let lost = histories[slot].tokens.len() - keep;
            (keep, std::cmp::Reverse(lost), std::cmp::Reverse(slot))
        });
    let matched = best.filter(|&(slot, keep)| {
        let history = &histories[slot];
        keep > 0 && (keep == history.tokens.len() || keep >= history.prompt_len)
    });
    let (slot, reused) = matched.unwrap_or_else(|| {
        let slot = *free
            .iter()
            .min_by_key(|&&slot| {
                let h = &histories[slot];
                (!h.tokens.is_empty(), h.last_used, slot)
            })
            .expect("choose_slot needs a free slot");
        (slot, shared(slot))
    });
    let donor = (0..histories.len())
        .filter(|&other| other != slot)
        .map(|other| (other, shared(other)))
        // Longest; among equals the lowest index.
        .max_by_key(|&(other, keep)| (keep, std::cmp::Reverse(other)))
        .filter(|&(_, keep)| keep > reused);
    let (reused, copy_from) = match donor {
        Some((from, keep)) => (keep, Some(from)),
        None => (reused, None),
    };
    SlotChoice {
        slot,
        reused,
        copy_from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot holding `tokens`, all of them a prompt (nothing generated yet).
    fn history(tokens: &[u32], last_used: u64) -> SlotHistory {
        SlotHistory {
            tokens: tokens.to_vec(),
            last_used,
            prompt_len: tokens.len(),
        }
    }

    #[test]
    fn the_slot_holding_the_conversation_is_resumed() {
        let conversation: Vec<u32> = (0..100).collect();
        let mut next_turn = conversation.clone();
        next_turn.extend([500, 501, 502]);
        let histories = [
            history(&[7, 8, 9], 5),
            history(&conversation, 1),
            SlotHistory::default(),
        ];
        let choice = choose_slot(&histories, &[0, 1, 2], &next_turn, next_turn.len() - 1);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 1,
                reused: 100,
                copy_from: None
            }
        );
    }

    #[test]
    fn a_short_common_prefix_does_not_destroy_a_long_conversation() {
        let conversation: Vec<u32> = (0..100).collect();
        let other: Vec<u32> = [0, 1, 2, 900, 901].to_vec();
        let histories = [history(&conversation, 1), SlotHistory::default()];
        // The empty slot is taken and the 3 shared tokens copied into it.
        let choice = choose_slot(&histories, &[0, 1], &other, other.len() - 1);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 1,
                reused: 3,
                copy_from: Some(0)
            }
        );
        // With no other free slot, the conversation's slot is taken and its prefix still used.
        let choice = choose_slot(&histories, &[0], &other, other.len() - 1);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 3,
                copy_from: None
            }
        );
    }

    #[test]
    fn a_conversation_whose_template_dropped_a_long_part_still_resumes() {
        // Turn 1 left 300 tokens of prompt and 1,000 of reasoning + answer; turn 2's template
        // keeps the prompt, drops the reasoning and adds 80 tokens.
        let mut turn_one: Vec<u32> = (0..300).collect();
        turn_one.extend(5000..6000);
        let mut next_turn: Vec<u32> = (0..300).collect();
        next_turn.extend(9000..9080);
        let histories = [
            SlotHistory {
                prompt_len: 300,
                ..history(&turn_one, 1)
            },
            SlotHistory::default(),
        ];
        let choice = choose_slot(&histories, &[0, 1], &next_turn, next_turn.len() - 1);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 300,
                copy_from: None
            }
        );
    }

    #[test]
    fn without_a_match_the_least_recently_used_slot_is_taken() {
        let histories = [history(&[1, 2], 9), history(&[3, 4], 2), history(&[5], 4)];
        let choice = choose_slot(&histories, &[0, 1, 2], &[8, 8, 8], 2);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 1,
                reused: 0,
                copy_from: None
            }
        );
        // Busy slots are not candidates.
        let choice = choose_slot(&histories, &[0, 2], &[8, 8, 8], 2);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 2,
                reused: 0,
                copy_from: None
            }
        );
    }

    #[test]
    fn the_last_input_token_is_always_fed_and_scoring_reuses_nothing() {
        let histories = [history(&[1, 2, 3, 4], 1)];
        // The same prompt again: all but its last token come from the cache.
        let choice = choose_slot(&histories, &[0], &[1, 2, 3, 4], 3);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 3,
                copy_from: None
            }
        );
        let choice = choose_slot(&histories, &[0], &[1, 2, 3, 4], 0);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 0,
                copy_from: None
            }
        );
    }

    #[test]
    fn a_longer_match_wins_over_recency() {
        let histories = [history(&[1, 2, 3, 9], 1), history(&[1, 2, 8], 7)];
        let choice = choose_slot(&histories, &[0, 1], &[1, 2, 3, 4, 5], 4);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 3,
                copy_from: None
            }
        );
    }

    #[test]
    fn a_shared_system_prompt_is_copied_from_another_slot() {
        let system: Vec<u32> = (0..40).collect();
        let conversation = [system.clone(), (100..160).collect()].concat();
        let other = [system.clone(), vec![900, 901, 902]].concat();
        let histories = [
            history(&conversation, 1),
            SlotHistory::default(),
            history(&[5, 6], 3),
        ];
        // Free slot 0 holds a conversation that shares only the system prompt: it is not cut,
        // the empty slot is taken and the prompt copied into it.
        let choice = choose_slot(&histories, &[0, 1, 2], &other, other.len() - 1);
        let copied = SlotChoice {
            slot: 1,
            reused: 40,
            copy_from: Some(0),
        };
        assert_eq!(choice, copied);
        // A busy slot lends its prefix too (slot 0 is not free here).
        let choice = choose_slot(&histories, &[1, 2], &other, other.len() - 1);
        assert_eq!(choice, copied);
    }

    #[test]
    fn a_resumed_conversation_keeps_its_slot_and_nothing_is_copied_for_less() {
        let conversation: Vec<u32> = (0..50).collect();
        let next_turn = [conversation.clone(), vec![70, 71]].concat();
        let histories = [history(&conversation[..20], 4), history(&conversation, 1)];
        let choice = choose_slot(&histories, &[0, 1], &next_turn, next_turn.len() - 1);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 1,
                reused: 50,
                copy_from: None
            }
        );
        // Scoring reuses nothing, so nothing is copied either.
        let choice = choose_slot(&histories, &[0], &next_turn, 0);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 0,
                copy_from: None
            }
        );
        // The only free slot is the least recently used and shares less than a busy one.
        let choice = choose_slot(&histories, &[0], &next_turn, next_turn.len() - 1);
        assert_eq!(
            choice,
            SlotChoice {
                slot: 0,
                reused: 50,
                copy_from: Some(1)
            }
        );
    }
}
