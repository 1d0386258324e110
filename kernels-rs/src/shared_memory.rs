//! The shared-memory rule of a kernel launch, checked on the host before a
//! launch: a block may use at most the device's opt-in limit
//! (`cudaDevAttrMaxSharedMemoryPerBlockOptin`: 227 KiB on sm_90, 163 KiB on
//! sm_80, 99 KiB on sm_86/sm_89) of static plus dynamic shared memory. The C
//! launchers read the static part from the compiled kernel
//! (`cudaFuncGetAttributes`) and opt a kernel in past 48 KiB of static plus
//! dynamic; [`SharedMemory::check`] turns a launch past the limit into a
//! clear error instead of an invalid-argument launch failure.

use crate::error::{ensure, Error, Result};

/// Shared memory of one launch of a kernel, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SharedMemory {
    /// The compiled kernel's `__shared__` arrays.
    pub static_bytes: usize,
    /// The launch's `extern __shared__` part.
    pub dynamic_bytes: usize,
    /// The device's per-block limit for a kernel that opts in.
    pub limit: usize,
}

impl SharedMemory {
    /// Static plus dynamic: what the limit applies to.
    pub fn total(&self) -> usize {
        self.static_bytes.saturating_add(self.dynamic_bytes)
    }

    /// `Error::Unsupported` when the launch needs more than the device
    /// allows; `dynamic` says what the dynamic part holds, `instead` what to
    /// do then.
    pub fn check(&self, op: &'static str, dynamic: &str, instead: &str) -> Result<()> {
        ensure(self.total() <= self.limit, || {
            Error::Unsupported {
            op,
            msg: format!(
                "needs {} bytes of shared memory per block ({} static + {} dynamic: {dynamic}), the device allows {}{instead}",
                self.total(),
                self.static_bytes,
                self.dynamic_bytes,
                self.limit
            ),
        }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(static_bytes: usize, dynamic_bytes: usize, limit: usize) -> SharedMemory {
        SharedMemory {
            static_bytes,
            dynamic_bytes,
            limit,
        }
    }

    fn refused(s: SharedMemory) -> bool {
        matches!(
            s.check("op", "x", ""),
            Err(Error::Unsupported { op: "op", .. })
        )
    }

    /// The limit is on static plus dynamic, up to and including it.
    #[test]
    fn the_limit_applies_to_static_plus_dynamic() {
        let limit = 232_448; // sm_90's opt-in limit
        assert!(!refused(sm(23_000, limit - 23_000, limit)));
        assert!(refused(sm(23_000, limit - 23_000 + 1, limit)));
        assert!(refused(sm(limit, 1, limit)));
        assert!(!refused(sm(0, limit, limit)));
        assert!(refused(sm(1, limit, limit)));
    }

    /// The fault of issue 11: a dynamic part under 48 KiB with 23 KB of
    /// static shared memory passes 48 KiB in total. On a device whose limit
    /// is 48 KiB (no opt-in) the launch must be refused, although the
    /// dynamic part alone fits; on sm_90 (227 KiB) it fits.
    #[test]
    fn a_dynamic_part_under_48_kib_is_not_enough() {
        let (static_bytes, dynamic_bytes) = (23_000, 8 * 1_000 * 4 + 1_008);
        assert!(dynamic_bytes < 48 * 1024 && static_bytes + dynamic_bytes > 48 * 1024);
        assert!(refused(sm(static_bytes, dynamic_bytes, 48 * 1024)));
        assert!(!refused(sm(static_bytes, dynamic_bytes, 232_448)));
    }

    /// No overflow: sizes near usize::MAX are refused, not wrapped.
    #[test]
    fn huge_sizes_do_not_wrap() {
        assert!(refused(sm(usize::MAX, 2, usize::MAX - 1)));
        assert_eq!(sm(usize::MAX, 2, 0).total(), usize::MAX);
    }

    /// The message names every number and what the dynamic part holds.
    #[test]
    fn the_error_says_what_was_needed_and_allowed() {
        let msg = match sm(23_000, 40_000, 50_000).check("op", "8 heads x 1000 regions", "; try B")
        {
            Err(Error::Unsupported { msg, .. }) => msg,
            other => panic!("{other:?}"),
        };
        for part in [
            "63000",
            "23000 static",
            "40000 dynamic",
            "8 heads x 1000 regions",
            "allows 50000",
            "; try B",
        ] {
            assert!(msg.contains(part), "{msg:?} lacks {part:?}");
        }
    }
}
