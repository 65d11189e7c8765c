//! Output on COM1, ftvm's 16550 UART, by polling: wait until the transmit
//! holding register is empty, then write the byte. No interrupts, no setup:
//! the VMM's UART accepts bytes in its reset state.
//!
//! Lines end in `\n` alone, so that what the guest prints is exactly what
//! lands in the VMM's serial output.

use core::fmt;

use ftvm_abi::COM1_PORT;

use crate::port::{inb, outb};

/// Transmit holding register (write), at the UART's base port.
const THR: u16 = COM1_PORT;
/// Line status register: 16550 register 5.
const LSR: u16 = COM1_PORT + 5;
/// LSR bit 5: the transmit holding register is empty.
const LSR_THRE: u8 = 1 << 5;

/// Writes one byte to COM1, waiting until the UART can take it.
pub fn write_byte(byte: u8) {
    // SAFETY: reading the line status register of the UART has no effect
    // on guest memory.
    while unsafe { inb(LSR) } & LSR_THRE == 0 {
        core::hint::spin_loop();
    }
    // SAFETY: the UART sends the byte to the console; it touches no guest
    // memory.
    unsafe { outb(THR, byte) };
}

/// COM1 as a [`fmt::Write`]: what [`print!`](crate::print) writes to.
#[derive(Clone, Copy, Debug, Default)]
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        text.bytes().for_each(write_byte);
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Writing to Serial cannot fail; only a Display impl can, and then the
    // rest of the line is dropped, which is all a console can do about it.
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints to COM1, like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to COM1 (ending in `\n`), like `std::println!`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::_print(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
