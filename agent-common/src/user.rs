//! Userspace-only impls (feature `user`).
use crate::*;

// SAFETY: all types are `#[repr(C)]`, `Copy`, contain only integers and byte
// arrays, and have explicit padding fields: every bit pattern is valid.
unsafe impl aya::Pod for TraceKey {}
unsafe impl aya::Pod for TraceContext {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowStats {}
unsafe impl aya::Pod for PortKey {}
unsafe impl aya::Pod for SockOwner {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for DatapathConfig {}
unsafe impl aya::Pod for TaskOffsets {}
unsafe impl aya::Pod for NetnsSlot {}
unsafe impl aya::Pod for HttpHeadEvent {}
unsafe impl aya::Pod for H2FramesEvent {}
unsafe impl aya::Pod for H2Flow {}
unsafe impl aya::Pod for H2Walk {}
