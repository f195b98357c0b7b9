#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xe_fuzz_harness::store::ids(data));
