//! The HTTP head path of passive capture: any captured bytes are parsed or
//! refused, never a panic; an accepted head yields a non-zero trace id.
#![no_main]
use tagflow::sources::capture::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let headers = ["x-request-id".to_string(), "x-correlation-id".to_string()];
    if let Ok((info, _)) = parse_head(&data[..data.len().min(1024)], &headers) {
        assert_ne!(info.trace_id, [0; 16]);
    }
});
