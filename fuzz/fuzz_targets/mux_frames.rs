#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| skein_proxy::fuzzing::mux_frames(data));
