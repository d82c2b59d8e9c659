//! Optimistic concurrency: a read-modify-write whose write lost a race (its precondition on the
//! version it read failed because another write came first) is done again on the object as it
//! is now, a bounded number of times, as kube-apiserver's `GuaranteedUpdate` does. The API's
//! PATCH, server-side apply and `/scale` run through [`guaranteed_update`]; CloudHub's reports,
//! whose commits are asynchronous, count their tries with [`may_try_again`].

/// How many times one read-modify-write is tried before the last conflict is answered.
pub const ATTEMPTS: usize = 8;

/// Whether a read-modify-write that has been tried `tries` times and lost the race each time
/// may be tried once more.
pub fn may_try_again(tries: usize) -> bool {
    tries < ATTEMPTS
}

/// Runs `attempt` (read, modify, write with the version read as precondition) until it
/// returns `Ok(Some(_))` or an error, at most [`ATTEMPTS`] times. `Ok(None)` means the write
/// lost a race and the whole attempt is run again on a fresh read; a precondition the caller
/// was given (a resourceVersion in the request) is an error, not `None`: it would fail again.
///
/// # Errors
/// `attempt`'s error; `exhausted()` when every attempt lost its race.
pub fn guaranteed_update<T, E>(
    mut attempt: impl FnMut() -> Result<Option<T>, E>,
    exhausted: impl FnOnce() -> E,
) -> Result<T, E> {
    for _ in 0..ATTEMPTS {
        if let Some(done) = attempt()? {
            return Ok(done);
        }
    }
    Err(exhausted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_race_is_tried_again_and_an_error_is_not() {
        let mut tries = 0;
        let done: Result<u32, &str> = guaranteed_update(
            || {
                tries += 1;
                Ok((tries == 3).then_some(7))
            },
            || "exhausted",
        );
        assert_eq!((done, tries), (Ok(7), 3));

        let mut tries = 0;
        let failed: Result<u32, &str> = guaranteed_update(
            || {
                tries += 1;
                Err("precondition")
            },
            || "exhausted",
        );
        assert_eq!((failed, tries), (Err("precondition"), 1));

        let mut tries = 0;
        let exhausted: Result<u32, &str> = guaranteed_update(
            || {
                tries += 1;
                Ok(None)
            },
            || "exhausted",
        );
        assert_eq!((exhausted, tries), (Err("exhausted"), ATTEMPTS));
        assert!(may_try_again(ATTEMPTS - 1) && !may_try_again(ATTEMPTS));
    }
}
