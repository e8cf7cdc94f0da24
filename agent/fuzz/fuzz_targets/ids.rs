//! Request id → trace id: any string maps or is refused; never all zero,
//! and stable under surrounding whitespace.
#![no_main]
use tagflow::ids::{identify, map_request_id, parse_traceparent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok((id, _)) = map_request_id(s) {
        assert_ne!(id, [0; 16]);
        assert_eq!(map_request_id(&format!(" {s}\t")).map(|r| r.0), Ok(id));
    }
    let _ = parse_traceparent(s);
    let _ = identify(Some(s), Some(s));
});
