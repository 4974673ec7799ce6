//! Secrets an operator gives `qutemailctl` (an account's password, a backup passphrase) come on
//! standard input, never on the command line where other users could read them: the first line
//! of a pipe or a file, or typed at a terminal. At a terminal the prompt goes to standard error
//! and the typing is not echoed (so it is neither shown nor left in a terminal's scrollback), and
//! a secret that is being set is asked twice: a typo in a new backup passphrase would make the
//! backup unreadable.

use std::io::{IsTerminal as _, Write as _};

use nix::sys::termios::{self, LocalFlags, SetArg};
use zeroize::Zeroizing;

/// Whether to ask a second time at a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Asked once (an existing secret).
    Once,
    /// Asked twice, and refused when the two differ (a secret being set).
    Twice,
}

/// Reads one secret line from standard input, without its line break; at a terminal, after
/// `prompt` on standard error and without echo. An empty line is returned as empty: the caller
/// says what it needs.
pub fn read_secret_line(prompt: &str, confirm: Confirm) -> std::io::Result<Zeroizing<String>> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return read_line(&mut stdin.lock());
    }
    let first = read_unechoed(prompt)?;
    if confirm == Confirm::Twice && !first.is_empty() {
        let again = read_unechoed("Again, to confirm: ")?;
        if *again != *first {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the two entries differ; nothing was changed",
            ));
        }
    }
    Ok(first)
}

fn read_line(input: &mut impl std::io::BufRead) -> std::io::Result<Zeroizing<String>> {
    let mut line = Zeroizing::new(String::new());
    input.read_line(&mut line)?;
    let len = line.trim_end_matches(['\r', '\n']).len();
    line.truncate(len);
    Ok(line)
}

/// Prompts on standard error and reads a line from the terminal with echo off; the terminal's
/// settings come back however the read ends (an interrupt included: the guard restores them
/// when the process unwinds; SIGINT's default action kills the process with echo off, as for
/// any such prompt, and `stty sane` or `reset` mends it).
fn read_unechoed(prompt: &str) -> std::io::Result<Zeroizing<String>> {
    let stdin = std::io::stdin();
    let saved = termios::tcgetattr(&stdin).map_err(std::io::Error::from)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    // Keep ECHONL so the Enter key still ends the line on screen.
    quiet.local_flags.insert(LocalFlags::ECHONL);
    // Echo goes off before the prompt shows, so nothing typed after the prompt is echoed or
    // lost; what was typed ahead of it is discarded (TCSAFLUSH), as getpass(3) does.
    termios::tcsetattr(&stdin, SetArg::TCSAFLUSH, &quiet).map_err(std::io::Error::from)?;
    struct Restore<'a>(&'a std::io::Stdin, termios::Termios);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let _ = termios::tcsetattr(self.0, SetArg::TCSANOW, &self.1);
        }
    }
    let _restore = Restore(&stdin, saved);
    let mut stderr = std::io::stderr();
    write!(stderr, "{prompt}")?;
    stderr.flush()?;
    read_line(&mut stdin.lock())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piped_line_loses_its_line_break_only() {
        for (input, want) in
            [("s3cret pass\r\nnext\n", "s3cret pass"), ("tail", "tail"), ("\n", ""), ("", "")]
        {
            let got = read_line(&mut std::io::Cursor::new(input)).unwrap();
            assert_eq!(got.as_str(), want, "{input:?}");
        }
    }
}
