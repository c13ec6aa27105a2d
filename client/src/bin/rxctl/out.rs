//! Everything rxctl prints on stdout goes through [`out!`] and [`outln!`]. When the reader has
//! gone (`rxctl models | head -1`), the write fails with `BrokenPipe` (Rust ignores SIGPIPE)
//! and rxctl ends there, quietly, with status 0, as ripgrep does: the reader took what it
//! wanted. Any other failure to write stdout panics, as `println!` does.

use std::io::{self, Write};

/// `print!` that ends rxctl quietly when stdout's reader has gone.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// `println!` that ends rxctl quietly when stdout's reader has gone.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes to stdout; see the module's doc.
pub fn write(args: std::fmt::Arguments) {
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        exit_if_closed(&e);
        panic!("failed printing to stdout: {e}");
    }
}

/// Ends rxctl with status 0 when `e` says stdout's reader has gone.
pub fn exit_if_closed(e: &io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
}
