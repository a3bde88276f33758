//! An exhaustive check of the doorbell's arm/ring protocol (`doorbell.rs`) under x86's memory
//! model (total store order: each core's stores wait in a FIFO store buffer, a fence or a
//! locked instruction drains it): every interleaving of one waiter and two ringers, every
//! moment a store buffer drains, and no run ends with the waiter asleep while a ringer's
//! update sits unseen. The same search finds the lost wake-up once the fences are removed,
//! so it can fail.

use std::collections::HashSet;

/// Memory words: the waiter count, the doorbell, then one head word per ringer.
const ARMED: usize = 0;
const BELL: usize = 1;
const HEAD: usize = 2;
const RINGERS: usize = 2;
const WORDS: usize = HEAD + RINGERS;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Thread {
    pc: u8,
    /// The waiter's `seen` doorbell value, or a ringer's loaded waiter count.
    local: u64,
    /// Stores not yet in memory, oldest first.
    buffer: Vec<(usize, u64)>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct State {
    mem: [u64; WORDS],
    /// The waiter, then the ringers.
    threads: Vec<Thread>,
}

impl State {
    fn load(&self, t: usize, word: usize) -> u64 {
        let buffered = self.threads[t]
            .buffer
            .iter()
            .rev()
            .find(|(w, _)| *w == word);
        buffered.map_or(self.mem[word], |&(_, v)| v)
    }
}

/// Waiter program counters.
const W_ARM: u8 = 0; // locked add: armed += 1
const W_FENCE: u8 = 1;
const W_SEEN: u8 = 2; // seen = bell
const W_CHECK: u8 = 3; // every head set: done, else sleep
const W_SLEEP: u8 = 4; // wakes once bell > seen
const W_DISARM: u8 = 5; // locked sub, then arm again
const W_DONE: u8 = 6;
/// Ringer program counters.
const R_HEAD: u8 = 0; // head = 1 (a plain store)
const R_FENCE: u8 = 1;
const R_COUNT: u8 = 2; // local = armed
const R_RING: u8 = 3; // if local > 0: locked add bell += 1
const R_DONE: u8 = 4;

/// One step of thread `t`, if it can take one (fences and locked instructions wait for an
/// empty store buffer; a sleeping waiter for the bell).
fn step(s: &State, t: usize, fences: bool) -> Option<State> {
    let mut n = s.clone();
    let th = &s.threads[t];
    let drained = th.buffer.is_empty();
    let pc = if t == 0 {
        match th.pc {
            W_ARM if drained => {
                n.mem[ARMED] += 1;
                W_FENCE
            }
            W_FENCE if drained || !fences => W_SEEN,
            W_SEEN => {
                n.threads[0].local = s.load(0, BELL);
                W_CHECK
            }
            W_CHECK if (0..RINGERS).all(|r| s.load(0, HEAD + r) == 1) => W_DONE,
            W_CHECK => W_SLEEP,
            W_SLEEP if s.load(0, BELL) > th.local => W_DISARM,
            W_DISARM if drained => {
                n.mem[ARMED] -= 1;
                W_ARM
            }
            _ => return None,
        }
    } else {
        match th.pc {
            R_HEAD => {
                n.threads[t].buffer.push((HEAD + t - 1, 1));
                R_FENCE
            }
            R_FENCE if drained || !fences => R_COUNT,
            R_COUNT => {
                n.threads[t].local = s.load(t, ARMED);
                R_RING
            }
            R_RING if th.local == 0 => R_DONE,
            R_RING if drained => {
                n.mem[BELL] += 1;
                R_DONE
            }
            _ => return None,
        }
    };
    n.threads[t].pc = pc;
    Some(n)
}

/// Searches every run; returns how many distinct states it saw and whether some run had the
/// waiter woken by the bell, or the first state where the waiter sleeps for good.
fn search(fences: bool) -> Result<(usize, bool), String> {
    let idle = Thread {
        pc: 0,
        local: 0,
        buffer: Vec::new(),
    };
    let start = State {
        mem: [0; WORDS],
        threads: vec![idle; 1 + RINGERS],
    };
    let mut seen = HashSet::new();
    let mut todo = vec![start];
    let mut woken = false;
    while let Some(s) = todo.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        woken |= s.threads[0].pc == W_DISARM;
        let mut next = Vec::new();
        for t in 0..s.threads.len() {
            next.extend(step(&s, t, fences));
            if !s.threads[t].buffer.is_empty() {
                let mut d = s.clone();
                let (w, v) = d.threads[t].buffer.remove(0);
                d.mem[w] = v;
                next.push(d);
            }
        }
        if next.is_empty() && s.threads[0].pc != W_DONE {
            return Err(format!(
                "the waiter sleeps for good: memory {:?}, seen {}",
                s.mem, s.threads[0].local
            ));
        }
        todo.extend(next);
    }
    Ok((seen.len(), woken))
}

#[test]
fn no_interleaving_loses_a_wake_up() {
    let (states, woken) = search(true).unwrap();
    assert!(
        woken,
        "no run slept and was rung awake: the search is not exploring"
    );
    assert!(
        states > 100,
        "only {states} states: the search is not exploring"
    );
}

#[test]
fn without_the_fences_a_wake_up_is_lost() {
    assert!(
        search(false).is_err(),
        "the search cannot find the known bug"
    );
}
