#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| detectd::fuzzing::http_body(data));
