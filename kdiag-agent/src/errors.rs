//! Errors as the agent reports them: with their causes.

use std::{error::Error, fmt};

/// Displays an error followed by its sources, each after `: `. A source
/// whose message already ends the text is not repeated: some errors (std's,
/// aya's) include their source's message in their own.
pub(crate) struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(error) = source {
            let message = error.to_string();
            if !text.ends_with(&message) {
                text.push_str(": ");
                text.push_str(&message);
            }
            source = error.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the perf buffer of cpu {cpu}")]
    struct Outer {
        cpu: u32,
        #[source]
        source: Middle,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("`perf_event_open` failed")]
    struct Middle(#[source] io::Error);

    /// Includes its source's message, as `{source}` in thiserror does.
    #[derive(Debug, thiserror::Error)]
    #[error("tracefs is not mounted: {0}")]
    struct Repeats(#[source] Middle);

    #[test]
    fn causes_follow_once() {
        let denied = || io::Error::from_raw_os_error(13);
        let outer = Outer {
            cpu: 1,
            source: Middle(denied()),
        };
        assert_eq!(
            Chain(&outer).to_string(),
            format!(
                "cannot open the perf buffer of cpu 1: `perf_event_open` failed: {}",
                denied()
            )
        );
        let repeats = Repeats(Middle(denied()));
        assert_eq!(
            Chain(&repeats).to_string(),
            format!(
                "tracefs is not mounted: `perf_event_open` failed: {}",
                denied()
            )
        );
    }
}
