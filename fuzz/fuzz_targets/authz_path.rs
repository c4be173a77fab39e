#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| skein_proxy::fuzzing::authz_path(data));
