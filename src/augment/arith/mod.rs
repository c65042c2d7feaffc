//! The arithmetic of the augmentation methods, apart from their batching: embedding
//! interpolation ([`mix`]), gradient-sign perturbation ([`fgsm`]) and nearest-neighbour
//! token replacement ([`replace`]).

pub mod fgsm;
pub mod mix;
pub mod replace;
