//! The agent's config parser: any text parses (and validates) or is an error.
#![no_main]
use tagflow::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(cfg) = AgentConfig::from_toml(s) {
            assert!(cfg.validate().is_ok());
        }
    }
});
