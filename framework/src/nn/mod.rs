//! Small reusable modules the models are built from.

pub mod attention;
pub mod attnres;
pub mod coord3d;
pub mod fused;
pub mod lora;
pub mod rope;
pub mod seq_block;
