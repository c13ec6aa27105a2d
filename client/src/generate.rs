//! Man pages and shell completions generated from a binary's clap definitions: the hidden
//! `--generate WHAT` flag of both `rxd` and `rxctl` (packaging/build-deb calls it at build
//! time). Behind the `generate` feature; knows nothing of either binary's flags.

use std::io::{self, Write};

/// What `--generate` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Generate {
    Man,
    CompleteBash,
    CompleteZsh,
    CompleteFish,
}

/// Writes a man page in manual `section` ("1" user commands, "8" daemons) or a completion
/// script for `cmd`, under `cmd`'s name, to `out`. The text is made in memory and written
/// at once, so a write that fails (a closed pipe) is the returned error, never a panic.
pub fn generate(
    what: Generate,
    mut cmd: clap::Command,
    section: &str,
    out: &mut dyn Write,
) -> io::Result<()> {
    use clap_complete::Shell;
    let mut text = Vec::new();
    let shell = match what {
        Generate::Man => None,
        Generate::CompleteBash => Some(Shell::Bash),
        Generate::CompleteZsh => Some(Shell::Zsh),
        Generate::CompleteFish => Some(Shell::Fish),
    };
    match shell {
        None => clap_mangen::Man::new(cmd)
            .section(section)
            .render(&mut text)?,
        Some(shell) => {
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, &mut cmd, name, &mut text);
        }
    }
    out.write_all(&text)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("demo")
            .about("a demo")
            .subcommand(clap::Command::new("run"))
    }

    fn text(what: Generate, section: &str) -> String {
        let mut out = Vec::new();
        generate(what, command(), section, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_man_page_is_in_the_section_asked_for() {
        assert!(text(Generate::Man, "8").contains(".TH demo 8"));
        assert!(text(Generate::Man, "1").contains(".TH demo 1"));
    }

    #[test]
    fn completions_name_the_command_and_its_subcommands() {
        let bash = text(Generate::CompleteBash, "1");
        assert!(
            bash.contains("complete -F") && bash.contains("run"),
            "{bash}"
        );
        assert!(text(Generate::CompleteZsh, "1").contains("#compdef demo"));
        assert!(text(Generate::CompleteFish, "1").contains("complete -c demo"));
    }

    #[test]
    fn a_closed_output_is_an_error_not_a_panic() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        for what in [Generate::Man, Generate::CompleteBash] {
            let e = generate(what, command(), "1", &mut Closed).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        }
    }
}
