//! Panic freedom: every public entry point of foveal (each op's CPU
//! function, the constructors and builders of its arguments, the sizing
//! helpers) fed arbitrary shapes, strides, lengths and index tables returns
//! an `Err` or a correct result, never a panic or an abort.
//!
//! proptest runs each case under `catch_unwind`: a panic fails the case and
//! is shrunk to a small one. "Correct" for an accepted call is checked two
//! ways: the invariants of the value built (a constructor's accessors give
//! back what it was given), and, for an op, the same call repeated on
//! contiguous copies of its inputs gives bit-identical outputs (so that
//! arbitrary strides, zero strides included, read the elements they name;
//! the math itself is checked against f64 oracles by each op's own tests).
//!
//! What the generators keep small, and why (see [`arb`]): storage (at most
//! 4,096 elements, so a huge dimension reaches an op only through a zero
//! stride or beside an empty one); the sizes an op loops over without
//! writing an output element per step (heads read only from an input, valid
//! lengths: small, or past the 32-bit limits so that they must be refused;
//! sizes in between are work in proportion, not a fault); and the counts of
//! the constructors that allocate what they are asked for
//! (`Lengths::full(batch, ..)`: one entry per row; a `KeepPositions` as wide
//! as the longest row), where running out of memory would not be foveal's
//! fault.
//!
//! Each fault these tests found is fixed at its source and kept as a regular
//! test beside the property that found it (`found_*`).

mod arb;
mod constructors;
mod focus;
mod gaze;
mod glance;
mod glimpse;
mod visor;
