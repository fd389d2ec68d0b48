//! The one-line error report of the `trainer` binary: the chain of causes, each printed once (errors that repeat
//! their source's text are not doubled), and what to do when the cause is a full disk.

use crate::durable::is_disk_full;

/// `err` and its causes joined by `": "`, skipping a cause whose text the report already contains; when an OS
/// error in the chain is a full disk (or quota) and no cause said so in words yet, a sentence saying what to do.
pub fn error_report(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    let disk_full = err.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(is_disk_full);
    if disk_full && !text.contains("disk holding") {
        text.push_str(
            ". The disk is full: free space there, then continue with --resume (the last complete checkpoint is \
             untouched)",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Repeating {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_repeated_by_its_parent_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let err = anyhow::Error::new(Repeating { path: "/x/y".into(), source: io }).context("saving");
        assert_eq!(error_report(&err), "saving: /x/y: denied");
    }

    #[test]
    fn a_full_disk_is_said_in_words_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err = anyhow::Error::new(Repeating { path: "/x/events".into(), source: io });
        let text = error_report(&err);
        assert_eq!(text.matches("No space left on device").count(), 1, "{text}");
        assert!(text.ends_with("then continue with --resume (the last complete checkpoint is untouched)"), "{text}");
    }
}
