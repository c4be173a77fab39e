#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| skein_operator::fuzzing::http2_frames(data));
