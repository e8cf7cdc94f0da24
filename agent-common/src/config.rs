//! Load-time configuration, read by the eBPF programs from the `CONFIG`
//! global (`.rodata`; set with `EbpfLoader::override_global`).

/// Symbol name of the config global in the eBPF object.
pub const CONFIG_SYMBOL: &str = "CONFIG";

/// `DatapathConfig.features`: keep per-flow stats in `FLOW_STATS`.
pub const FEATURE_FLOW_STATS: u32 = 1 << 0;
/// `DatapathConfig.features`: emit `EVENT_NEW_FLOW` records (needs FLOW_STATS
/// to know which pairs are new).
pub const FEATURE_EVENTS: u32 = 1 << 1;
/// `DatapathConfig.features`: write the skb->cb ABI on tagged packets.
pub const FEATURE_CB: u32 = 1 << 2;

pub const FEATURES_DEFAULT: u32 = FEATURE_FLOW_STATS | FEATURE_EVENTS | FEATURE_CB;

/// Upper bound of `DatapathConfig.capture_len`: the size of the data area of
/// an HTTP head record (the ring-buffer reservation is fixed-size).
pub const MAX_CAPTURE: usize = 1024;
/// Default bytes of an HTTP request head copied to userspace.
pub const DEFAULT_CAPTURE: u32 = 512;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// On tagged packets: `mark = (mark & !mark_mask) | (mark_value & mark_mask)`.
    /// A zero mask (the default) leaves the mark alone.
    pub mark_value: u32,
    pub mark_mask: u32,
    /// `FEATURE_*` bits.
    pub features: u32,
    pub _pad: u32,
    /// Cookie of the agent's (host) namespace. Packets whose socket is there
    /// (or that have none: the helper then reports init_net) take their
    /// namespace from `IFACE_NETNS` instead.
    pub host_netns: u64,
    /// Bytes of a TCP payload that starts like an HTTP/1.x request head to
    /// copy to userspace (0 = passive capture off; ≤ MAX_CAPTURE).
    pub capture_len: u32,
    pub _pad2: u32,
}

impl DatapathConfig {
    pub const DEFAULT: Self = Self {
        mark_value: 0,
        mark_mask: 0,
        features: FEATURES_DEFAULT,
        _pad: 0,
        host_netns: 0,
        capture_len: DEFAULT_CAPTURE,
        _pad2: 0,
    };
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 32);

/// Symbol name of the task-offsets global in the eBPF object.
pub const TASK_OFFSETS_SYMBOL: &str = "TASK_OFFSETS";

/// Byte offsets of `pid` and `tgid` in the running kernel's `struct
/// task_struct`, from its BTF (the eBPF crate has no CO-RE). Zero: unknown,
/// the fork hook does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    pub pid: u32,
    pub tgid: u32,
}

const _: () = assert!(core::mem::size_of::<TaskOffsets>() == 8);
