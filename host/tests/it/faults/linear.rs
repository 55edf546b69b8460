//! A linearizability checker for one register (a key of a key-value store
//! read and written whole): Wing and Gong's search with Lowe's memo of
//! (operations linearized, value) pairs already explored, in the spirit of
//! Knossos and Porcupine. Keys are independent (P-compositionality), so a
//! history is checked one key at a time.

use std::collections::HashSet;
use std::time::Instant;

/// One operation on the register.
#[derive(Debug, Clone)]
pub struct RegisterOp {
    pub write: bool,
    /// Written, or read (`None`: the key was absent).
    pub value: Option<String>,
    pub call: Instant,
    /// When the answer came; `None`: no answer, so it may have taken
    /// effect at any point after `call`, or never (a read without an
    /// answer says nothing and is left out).
    pub end: Option<Instant>,
    /// Who did it, through which host: for a report.
    pub by: String,
}

/// Whether some order of the operations, each placed between its call and
/// its answer, makes every read return the latest write before it (every
/// value written once: the workload writes unique values).
pub fn check(ops: &[RegisterOp]) -> Result<(), String> {
    // A write without an answer matters only if a read saw its value: a
    // linearization that places one nobody read stays valid without it.
    let read: HashSet<&Option<String>> = ops
        .iter()
        .filter(|o| !o.write && o.end.is_some())
        .map(|o| &o.value)
        .collect();
    let ops: Vec<&RegisterOp> = ops
        .iter()
        .filter(|o| o.end.is_some() || (o.write && read.contains(&o.value)))
        .collect();
    let definite: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].end.is_some()).collect();
    let words = ops.len().div_ceil(64);
    // (linearized, the write whose value the register holds)
    let mut seen: HashSet<(Vec<u64>, Option<usize>)> = HashSet::new();
    let mut stack = vec![(vec![0u64; words], None::<usize>)];
    let mut deepest = 0;
    while let Some((done, holds)) = stack.pop() {
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        let placed = definite.iter().filter(|&&i| is_done(i)).count();
        if placed == definite.len() {
            return Ok(());
        }
        deepest = deepest.max(placed);
        if !seen.insert((done.clone(), holds)) {
            continue;
        }
        // The earliest answer among what is left: only operations called
        // before it can come next.
        let horizon = definite
            .iter()
            .filter(|&&i| !is_done(i))
            .filter_map(|&i| ops[i].end)
            .min();
        let value = holds.and_then(|w| ops[w].value.as_ref());
        for (i, op) in ops.iter().enumerate() {
            if is_done(i) || horizon.is_some_and(|h| op.call >= h) {
                continue;
            }
            let next = if op.write {
                Some(i)
            } else if op.value.as_ref() == value {
                holds
            } else {
                continue;
            };
            let mut more = done.clone();
            more[i / 64] |= 1 << (i % 64);
            stack.push((more, next));
        }
    }
    let start = ops.iter().map(|o| o.call).min();
    let ms = |t: Instant| start.map_or(0, |s| t.duration_since(s).as_millis());
    let mut shown: Vec<&&RegisterOp> = ops.iter().collect();
    shown.sort_by_key(|o| o.call);
    let history: Vec<String> = shown
        .iter()
        .map(|o| {
            format!(
                "{} {} {:?} {}..{}",
                o.by,
                if o.write { "write" } else { "read" },
                o.value,
                ms(o.call),
                o.end.map_or("?".to_string(), |e| ms(e).to_string())
            )
        })
        .collect();
    Err(format!(
        "not linearizable: at most {deepest} of {} answered operations can be ordered; history (ms):\n  {}",
        definite.len(),
        history.join("\n  ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(base: Instant, from: u64, to: Option<u64>) -> (Instant, Option<Instant>) {
        (
            base + Duration::from_millis(from),
            to.map(|t| base + Duration::from_millis(t)),
        )
    }

    fn op(
        base: Instant,
        write: bool,
        value: Option<&str>,
        from: u64,
        to: Option<u64>,
    ) -> RegisterOp {
        let (call, end) = at(base, from, to);
        RegisterOp {
            write,
            value: value.map(str::to_string),
            call,
            end,
            by: String::new(),
        }
    }

    #[test]
    fn overlapping_writes_may_be_read_in_either_order() {
        let t = Instant::now();
        let history = [
            op(t, true, Some("a"), 0, Some(10)),
            op(t, true, Some("b"), 5, Some(15)),
            op(t, false, Some("a"), 20, Some(25)),
        ];
        assert!(check(&history).is_ok());
    }

    #[test]
    fn a_stale_read_is_caught() {
        let t = Instant::now();
        let history = [
            op(t, true, Some("a"), 0, Some(10)),
            op(t, true, Some("b"), 20, Some(30)),
            op(t, false, Some("a"), 40, Some(50)),
        ];
        assert!(check(&history).is_err());
    }

    #[test]
    fn a_read_before_any_write_sees_nothing() {
        let t = Instant::now();
        assert!(check(&[op(t, false, None, 0, Some(1))]).is_ok());
        let history = [
            op(t, true, Some("a"), 0, Some(10)),
            op(t, false, None, 20, Some(30)),
        ];
        assert!(check(&history).is_err());
    }

    #[test]
    fn an_unanswered_write_may_land_late_or_never() {
        let t = Instant::now();
        let late = [
            op(t, true, Some("a"), 0, Some(10)),
            op(t, true, Some("b"), 5, None),
            op(t, false, Some("a"), 20, Some(25)),
            op(t, false, Some("b"), 30, Some(35)),
        ];
        assert!(check(&late).is_ok());
        // ...but not before it was sent.
        let early = [
            op(t, false, Some("b"), 0, Some(5)),
            op(t, true, Some("b"), 10, None),
        ];
        assert!(check(&early).is_err());
    }

    #[test]
    fn a_value_read_back_after_another_was_read_is_caught() {
        let t = Instant::now();
        let history = [
            op(t, true, Some("a"), 0, Some(100)),
            op(t, true, Some("b"), 0, Some(100)),
            op(t, false, Some("a"), 10, Some(20)),
            op(t, false, Some("b"), 30, Some(40)),
            op(t, false, Some("a"), 50, Some(60)),
        ];
        assert!(check(&history).is_err());
    }
}
