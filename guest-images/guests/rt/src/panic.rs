//! What a panic does in a guest: print the message on COM1, report through
//! pvpanic, and halt for good. No unwinding (panic = "abort").

use core::panic::PanicInfo;

use crate::{halt, println, pvpanic, set_timer};

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    // Must not allocate: a panic may come from the allocator itself, or
    // before the heap exists.
    match info.location() {
        Some(at) => println!("guest panicked at {}:{}:{}: {}", at.file(), at.line(), at.column(), info.message()),
        None => println!("guest panicked: {}", info.message()),
    }
    pvpanic();
    // The VMM normally stops the guest on pvpanic. If it lets it run, sleep
    // with no deadline instead of waking up to spin.
    set_timer(0);
    loop {
        halt();
    }
}

/// Referenced by the precompiled `core` of this target, which is built with
/// unwinding; never called, since nothing unwinds here. Release builds drop
/// the reference through LTO, dev builds need the symbol to link.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
