//! Panics as errors. tch reports a libtorch failure (an unsupported dtype on a device, a failed SyncBN
//! collective) by panicking; the trainer turns such a panic into an ordinary error naming where it happened,
//! instead of a panic trace and a lost run.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Silences the default panic message (the caller reports the error once, with context). The binary installs
/// this at start; library users keep their own hook.
pub fn install_quiet_hook() {
    std::panic::set_hook(Box::new(|_| {}));
}

/// Runs `f`, converting a panic into an error whose message is the panic's (libtorch's C++ backtrace cut off).
pub fn catch<T>(f: impl FnOnce() -> T) -> anyhow::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        anyhow::anyhow!("internal error: {}", first_line(text))
    })
}

/// The useful part of a panic message: libtorch errors carry a C++ backtrace after the first line.
fn first_line(text: &str) -> String {
    let cut = text.find("\\nException raised from").or_else(|| text.find("\nException raised from"));
    let head = cut.map_or(text, |i| &text[..i]);
    head.lines().next().unwrap_or(head).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_without_the_cpp_backtrace() {
        let err = catch(|| -> i32 {
            panic!("called `Result::unwrap()` on an `Err` value: Torch(\"\\\"addmm\\\" not implemented for 'Half'\\nException raised from operator() at x.cpp:18\")")
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("internal error: called `Result::unwrap()`"), "{err}");
        assert!(err.contains("not implemented for 'Half'"), "{err}");
        assert!(!err.contains("Exception raised"), "{err}");
        assert_eq!(catch(|| 7).unwrap(), 7);
    }
}
