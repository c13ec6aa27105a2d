//! Issue 19: a hostile local client cannot crash, stall, starve or fool rxd, nor gain admin
//! rights. Each attack runs against the real daemon while a well-behaved client keeps being
//! served ([`common::Bystander`]); each test checks the daemon's fds, memory and answers after.
//! Attacks that need another user connect through `rxd-connect-as` (the suite runs as root,
//! as CI does).

mod common;
mod conn;
mod models;
mod peer;
mod publish;
mod redteam;
mod ring;
mod sched;
