//! The BERT model: encoder (from ids or from word embeddings), classification head,
//! and Hugging Face checkpoint loading and saving.

pub mod bert;
pub mod checkpoint;
pub mod head;
pub mod kernels;
pub mod params;

pub use bert::{Bert, BertConfig, Ctx};
pub use checkpoint::Checkpoint;
pub use head::SeqClassifier;
pub use params::Params;
