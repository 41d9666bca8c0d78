//! Admission and fairness: which waiting request gets the next free slot.
//!
//! The rule, in order: the client with the fewest running requests; then the client admitted
//! least recently (one never admitted first); then the oldest request. Clients with waiting
//! requests thus take turns, so a client with 50 queued requests cannot keep another client's
//! single request waiting for more than one free slot.
//!
//! Pure bookkeeping over plain values: the runners hold it under their queue's lock, and the
//! tests below drive it directly.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Something that waits for a slot on behalf of a client.
pub trait Queued {
    type Client: Clone + Eq + Hash;
    fn client(&self) -> &Self::Client;
}

/// The waiting requests of one model and the running count per client.
#[derive(Debug)]
pub struct Admission<T: Queued> {
    /// In arrival order, each with its arrival number.
    waiting: VecDeque<(u64, T)>,
    running: HashMap<T::Client, usize>,
    /// Admission number of each client's latest admitted request.
    last_admitted: HashMap<T::Client, u64>,
    admissions: u64,
    arrivals: u64,
}

impl<T: Queued> Default for Admission<T> {
    fn default() -> Self {
        Admission {
            waiting: VecDeque::new(),
            running: HashMap::new(),
            last_admitted: HashMap::new(),
            admissions: 0,
            arrivals: 0,
        }
    }
}

impl<T: Queued> Admission<T> {
    pub fn new() -> Admission<T> {
        Admission::default()
    }

    /// A request arrives; it waits until [`Admission::admit_next`] picks it.
    pub fn enqueue(&mut self, item: T) {
        self.waiting.push_back((self.arrivals, item));
        self.arrivals += 1;
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted and not yet finished.
    pub fn running(&self) -> usize {
        self.running.values().sum()
    }

    /// Takes out the waiting requests for which `remove` is true (clients that left,
    /// deadlines that passed), in arrival order.
    pub fn take_waiting_where(&mut self, mut remove: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for (arrival, item) in self.waiting.drain(..) {
            if remove(&item) {
                taken.push(item);
            } else {
                kept.push_back((arrival, item));
            }
        }
        self.waiting = kept;
        taken
    }

    /// Every waiting request, and forgets the running ones (the model is ending).
    pub fn drain(&mut self) -> Vec<T> {
        self.running.clear();
        self.waiting.drain(..).map(|(_, item)| item).collect()
    }

    /// The next request to admit under the rule above; it counts as running from now on.
    pub fn admit_next(&mut self) -> Option<T> {
        let best = self
            .waiting
            .iter()
            .enumerate()
            .min_by_key(|(_, (arrival, item))| {
                let client = item.client();
                let running = self.running.get(client).copied().unwrap_or(0);
                let last = self.last_admitted.get(client).map_or(0, |&n| n + 1);
                (running, last, *arrival)
            })
            .map(|(index, _)| index)?;
        let (_, item) = self.waiting.remove(best)?;
        self.admissions += 1;
        let client = item.client().clone();
        *self.running.entry(client.clone()).or_default() += 1;
        self.last_admitted.insert(client, self.admissions);
        // Forget clients with nothing waiting or running, so the table stays small.
        let Admission {
            waiting,
            running,
            last_admitted,
            ..
        } = self;
        last_admitted.retain(|client, _| {
            running.contains_key(client) || waiting.iter().any(|(_, w)| w.client() == client)
        });
        Some(item)
    }

    /// A running request of `client` ended (finished, failed or cancelled).
    pub fn finished(&mut self, client: &T::Client) {
        if let Some(n) = self.running.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Req {
        client: &'static str,
        n: u32,
    }

    impl Queued for Req {
        type Client = &'static str;
        fn client(&self) -> &&'static str {
            &self.client
        }
    }

    fn req(client: &'static str, n: u32) -> Req {
        Req { client, n }
    }

    #[test]
    fn a_single_request_is_not_starved_by_a_flood() {
        let mut a = Admission::new();
        for n in 0..50 {
            a.enqueue(req("flood", n));
        }
        a.enqueue(req("single", 0));
        // One slot: the flood's first request takes it.
        assert_eq!(a.admit_next(), Some(req("flood", 0)));
        a.finished(&"flood");
        // The slot frees: the single request, never admitted, goes before the flood's second.
        assert_eq!(a.admit_next(), Some(req("single", 0)));
        a.finished(&"single");
        assert_eq!(a.admit_next(), Some(req("flood", 1)));
        assert_eq!(a.waiting(), 48);
        assert_eq!(a.running(), 1);
    }

    #[test]
    fn free_slots_go_to_the_client_with_the_fewest_running() {
        let mut a = Admission::new();
        for n in 0..4 {
            a.enqueue(req("a", n));
        }
        a.enqueue(req("b", 0));
        a.enqueue(req("b", 1));
        // Four slots at once: the clients alternate, oldest request first within a client.
        let order: Vec<Req> = std::iter::from_fn(|| a.admit_next()).take(4).collect();
        assert_eq!(
            order,
            vec![req("a", 0), req("b", 0), req("a", 1), req("b", 1)]
        );
        assert_eq!(a.running(), 4);
        // b's requests finish first; a's next waits behind nobody.
        a.finished(&"b");
        a.finished(&"b");
        assert_eq!(a.admit_next(), Some(req("a", 2)));
    }

    #[test]
    fn clients_take_turns_in_order_of_their_last_admission() {
        let mut a = Admission::new();
        for client in ["x", "y", "z"] {
            a.enqueue(req(client, 0));
            a.enqueue(req(client, 1));
        }
        let mut order = Vec::new();
        while let Some(r) = a.admit_next() {
            order.push((r.client, r.n));
            a.finished(&r.client);
        }
        assert_eq!(
            order,
            vec![("x", 0), ("y", 0), ("z", 0), ("x", 1), ("y", 1), ("z", 1)]
        );
    }

    #[test]
    fn abandoned_requests_are_taken_out_and_draining_forgets_the_running() {
        let mut a = Admission::new();
        for n in 0..5 {
            a.enqueue(req("a", n));
        }
        let gone = a.take_waiting_where(|r| r.n % 2 == 1);
        assert_eq!(gone, vec![req("a", 1), req("a", 3)]);
        assert_eq!(a.admit_next(), Some(req("a", 0)));
        assert_eq!(a.drain(), vec![req("a", 2), req("a", 4)]);
        assert_eq!((a.waiting(), a.running()), (0, 0));
        assert_eq!(a.admit_next(), None);
    }
}
