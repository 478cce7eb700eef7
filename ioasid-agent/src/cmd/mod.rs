//! The command line: `cli` (clap) and one module per subcommand other than `run`.

pub mod cli;
pub mod learn;
pub mod policy;
pub mod probe;
pub mod replay;
pub mod run;
pub mod status;
pub mod top;
