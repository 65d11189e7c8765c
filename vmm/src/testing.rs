//! Helpers for tests that need KVM.

/// Whether `/dev/kvm` can be used. When it cannot and `FTVM_REQUIRE_KVM=1`
/// (CI sets it), panics: a KVM test must fail there, never skip.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("FTVM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("FTVM_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("skipping: /dev/kvm cannot be opened ({e}) and FTVM_REQUIRE_KVM is not 1");
            false
        }
    }
}
