//! Optional log lines from the data path (aya-log), for looking at single
//! flows on a dev box. Off unless the agent runs with `--bpf-log`: `LB_LOG`
//! is read-only data that the loader sets before verification, so with it
//! at 0 the verifier knows the branch is never taken and removes the
//! logging code: nothing is paid per packet.

#[unsafe(no_mangle)]
static LB_LOG: u8 = 0;

#[inline(always)]
pub fn enabled() -> bool {
    // Volatile: the compiler must not fold the 0 written here; the loader
    // patches the value in the object.
    unsafe { core::ptr::read_volatile(&LB_LOG) != 0 }
}
