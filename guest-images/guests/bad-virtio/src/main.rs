//! `bad-virtio`: a hostile NIC driver. Brings the virtio-net device up
//! properly, then posts a TX descriptor whose buffer lies outside guest
//! memory (`--param case=outside`, the default), a descriptor chain that
//! loops (`case=loop`), or a queue size that is not a power of two
//! (`case=size`), and notifies. The VMM must end the run with a typed device
//! error; if it lets the guest go on, the guest prints
//! `bad-virtio: still running` and powers off with 0.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use ftvm_abi::VIRTIO_MMIO_BASE;

rt::entry!(main);

const MAGIC: u64 = 0x000;
const DEVICE_ID: u64 = 0x008;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;

const TX_QUEUE: u32 = 1;
const QUEUE_SIZE: u32 = 16;
const DESC_F_NEXT: u16 = 1;

/// Descriptor table, available ring and used ring, one page each.
#[repr(C, align(4096))]
struct Rings([u8; 3 * 4096]);

static mut RINGS: Rings = Rings([0; 3 * 4096]);

fn reg_write(offset: u64, value: u32) {
    // SAFETY: VIRTIO_MMIO_BASE is the NIC's MMIO slot above all RAM, where no
    // Rust object lives; the write is an exit the VMM serves.
    unsafe { write_volatile((VIRTIO_MMIO_BASE + offset) as *mut u32, value) };
}

fn reg_read(offset: u64) -> u32 {
    // SAFETY: as in `reg_write`.
    unsafe { read_volatile((VIRTIO_MMIO_BASE + offset) as *const u32) }
}

fn write_desc(base: *mut u8, index: usize, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: `base` is the descriptor page of RINGS, 4096 bytes; index <
    // QUEUE_SIZE (16) descriptors of 16 bytes stay inside it.
    unsafe {
        let d = base.add(index * 16);
        write_volatile(d as *mut u64, addr);
        write_volatile(d.add(8) as *mut u32, len);
        write_volatile(d.add(12) as *mut u16, flags);
        write_volatile(d.add(14) as *mut u16, next);
    }
}

fn main(boot: &rt::BootParams) -> u32 {
    if reg_read(MAGIC) != 0x7472_6976 || reg_read(DEVICE_ID) != 1 {
        rt::println!("bad-virtio: no virtio-net device");
        return 2;
    }
    let case = boot.param("case").unwrap_or("outside");
    // RINGS is only ever touched here, through raw pointers, by the one
    // thread the guest has.
    let base = core::ptr::addr_of_mut!(RINGS) as *mut u8;
    let (desc, avail, used) = (base as u64, base as u64 + 4096, base as u64 + 8192);

    reg_write(STATUS, 0);
    reg_write(STATUS, 1 | 2); // ACKNOWLEDGE | DRIVER
    reg_write(DRIVER_FEATURES_SEL, 1);
    reg_write(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
    reg_write(DRIVER_FEATURES_SEL, 0);
    reg_write(DRIVER_FEATURES, 0);
    reg_write(STATUS, 1 | 2 | 8); // FEATURES_OK
    reg_write(QUEUE_SEL, TX_QUEUE);
    reg_write(QUEUE_NUM, if case == "size" { 3 } else { QUEUE_SIZE });
    reg_write(QUEUE_DESC_LOW, desc as u32);
    reg_write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
    reg_write(QUEUE_DRIVER_LOW, avail as u32);
    reg_write(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    reg_write(QUEUE_DEVICE_LOW, used as u32);
    reg_write(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    reg_write(QUEUE_READY, 1);
    reg_write(STATUS, 1 | 2 | 8 | 4); // DRIVER_OK
    rt::println!("bad-virtio: posting a hostile TX chain ({case})");

    match case {
        "loop" => {
            write_desc(base, 0, desc, 64, DESC_F_NEXT, 1);
            write_desc(base, 1, desc, 64, DESC_F_NEXT, 0);
        }
        // 256 TiB: far outside any guest memory.
        _ => write_desc(base, 0, 0x1000_0000_0000, 1514, 0, 0),
    }
    // SAFETY: the available ring is the second page of RINGS: flags (u16),
    // idx (u16), ring[0] (u16).
    unsafe {
        let a = base.add(4096);
        write_volatile(a.add(4) as *mut u16, 0);
        write_volatile(a.add(2) as *mut u16, 1);
    }
    reg_write(QUEUE_NOTIFY, TX_QUEUE);
    rt::println!("bad-virtio: still running");
    0
}
