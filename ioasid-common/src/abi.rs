//! x86 and KVM ABI constants the programs and the agent rely on (see docs/KERNEL-NOTES.md).

/// kvm:kvm_exit `isa` values.
pub const KVM_ISA_VMX: u32 = 1;
pub const KVM_ISA_SVM: u32 = 2;
pub const VMX_EXIT_REASON_INVD: u64 = 13;
pub const VMX_EXIT_REASON_WBINVD: u64 = 54;
/// VMX exit reasons carry flags in the upper half; the basic reason is the low 16 bits.
pub const VMX_EXIT_REASON_BASIC_MASK: u64 = 0xffff;
pub const SVM_EXIT_INVD: u64 = 0x76;
pub const SVM_EXIT_WBINVD: u64 = 0x89;

/// kvm:kvm_emulate_insn `flags`: set when the guest runs in 64-bit mode (CS.L).
pub const KVM_EMUL_INSN_F_CS_L: u8 = 1 << 3;

/// `struct kvm_create_device::type` of the kvm-vfio device.
pub const KVM_DEV_TYPE_VFIO: u32 = 4;
/// `KVM_DEV_VFIO_FILE`, alias `KVM_DEV_VFIO_GROUP`: the attribute group of kvm-vfio.
pub const KVM_DEV_VFIO_FILE: u32 = 1;
pub const KVM_DEV_VFIO_FILE_ADD: u64 = 1;
pub const KVM_DEV_VFIO_FILE_DEL: u64 = 2;

/// VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments.
pub const VFIO_TYPE1V2_IOMMU: u64 = 3;
pub const VFIO_DMA_CC_IOMMU: u64 = 4;

/// x86-64 `struct pt_regs` offsets (arch/x86/include/asm/ptrace.h, the ptrace ABI order,
/// unchanged since 2.6; FRED in 6.9 reused only the cs/ss slots). The tp_btf sys_enter program
/// reads the ioctl arguments from them: fd in di, request in si, argument in dx.
pub const PT_REGS_DX: usize = 96;
pub const PT_REGS_SI: usize = 104;
pub const PT_REGS_DI: usize = 112;
/// x86-64 syscall number of ioctl.
pub const NR_IOCTL: i64 = 16;

pub const SIGKILL: u32 = 9;
pub const SIGSTOP: u32 = 19;
pub const EPERM: i32 = 1;
