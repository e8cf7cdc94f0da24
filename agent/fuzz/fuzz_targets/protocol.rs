//! The registration protocol decoder: any bytes either decode or yield an
//! error code; what decodes re-encodes to a frame that decodes the same.
#![no_main]
use tagflow::sources::protocol::{decode_request, encode_request, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = frame_len(data);
    if let Ok(req) = decode_request(data) {
        let frame = encode_request(&req);
        let n = frame_len(&frame).expect("own frames are valid").expect("complete");
        assert_eq!(decode_request(&frame[4..4 + n]).expect("own frames decode"), req);
    }
});
