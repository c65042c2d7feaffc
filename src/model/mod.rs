//! The encoder families (BERT, RoBERTa, XLM-R, DistilBERT, DeBERTa-v2/v3): encoder (from
//! ids or from word embeddings), classification head, and Hugging Face checkpoint loading
//! and saving.

pub mod bert;
pub mod checkpoint;
pub mod deberta;
pub mod family;
pub mod head;
pub mod kernels;
pub mod params;

pub use bert::{Bert, BertConfig, Ctx};
pub use checkpoint::Checkpoint;
pub use family::Family;
pub use head::SeqClassifier;
pub use params::Params;
