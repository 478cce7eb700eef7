pub mod policy;
pub mod replay;
pub mod status;
