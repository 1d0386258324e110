//! The one error type of foveal. Every op validates its arguments before it
//! launches anything and reports the first violation it finds.

use std::fmt;

/// What went wrong, with enough context to find the offending argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A tensor's rank, shape, strides or storage length does not fit.
    Shape {
        /// The op (or constructor) that refused the call.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// What was expected and what was given.
        msg: String,
    },
    /// An index or length is outside the range it must lie in.
    Index {
        /// The op (or constructor) that refused the call.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// Which index, and the range it must lie in.
        msg: String,
    },
    /// A scalar argument (k, a ratio, a threshold...) is out of its domain.
    Value {
        /// The op (or constructor) that refused the call.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// The value and its domain.
        msg: String,
    },
    /// The arguments are valid but this build or device cannot run them
    /// (for example a head dim past the largest the kernels were built for).
    Unsupported {
        /// The op that cannot run the call.
        op: &'static str,
        /// Which limit the call passes, and what to do instead where there is a way.
        msg: String,
    },
    /// A CUDA call failed (launch error, allocation, driver error).
    Cuda {
        /// The op (or device structure) whose CUDA call failed.
        op: &'static str,
        /// The driver's or runtime's message (and status code).
        msg: String,
    },
}

impl Error {
    pub(crate) fn shape(op: &'static str, arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            arg,
            msg: msg.into(),
        }
    }
    pub(crate) fn index(op: &'static str, arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Index {
            op,
            arg,
            msg: msg.into(),
        }
    }
    pub(crate) fn value(op: &'static str, arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Value {
            op,
            arg,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { op, arg, msg } => write!(f, "{op}: bad shape of `{arg}`: {msg}"),
            Error::Index { op, arg, msg } => {
                write!(f, "{op}: index out of range in `{arg}`: {msg}")
            }
            Error::Value { op, arg, msg } => write!(f, "{op}: bad value of `{arg}`: {msg}"),
            Error::Unsupported { op, msg } => write!(f, "{op}: unsupported: {msg}"),
            Error::Cuda { op, msg } => write!(f, "{op}: CUDA error: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// The result of every fallible call of foveal.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks a condition, returning the given error when it fails.
pub(crate) fn ensure(cond: bool, err: impl FnOnce() -> Error) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(err())
    }
}
