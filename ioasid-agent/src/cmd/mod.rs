pub mod learn;
pub mod policy;
pub mod replay;
pub mod status;
pub mod top;
