//! The CRAS model: its trained head, the ONNX graph builder and the bundle format.

pub mod aggregation;
pub mod bundle;
pub mod embedding;
pub mod graph;
pub mod head;
pub mod map;
pub mod provenance;
pub mod score;
pub mod views;
