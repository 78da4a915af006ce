"""cffi build script for the Linux syscalls Python 3.11 does not wrap.

Built at install time (`pip install -e .`) into `runtime._syscalls`; only
`runtime.syscalls` imports the result.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    struct mount_attr {
        uint64_t attr_set;
        uint64_t attr_clr;
        uint64_t propagation;
        uint64_t userns_fd;
    };
    int hostd_open_tree(int dfd, const char *path, unsigned int flags);
    int hostd_mount_setattr(int dfd, const char *path, unsigned int flags,
                            struct mount_attr *attr, size_t size);
    int hostd_move_mount(int from_dfd, const char *from_path, int to_dfd,
                         const char *to_path, unsigned int flags);
    int mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const void *data);
    int umount2(const char *target, int flags);
    int unshare(int flags);
    int setns(int fd, int nstype);
    int hostd_set_child_subreaper(void);
    int hostd_openat2(int dfd, const char *path, uint64_t flags, uint64_t mode,
                      uint64_t resolve);

    #define OPEN_TREE_CLONE ...
    #define OPEN_TREE_CLOEXEC ...
    #define AT_RECURSIVE ...
    #define AT_EMPTY_PATH ...
    #define MOVE_MOUNT_F_EMPTY_PATH ...
    #define MOUNT_ATTR_IDMAP ...
    #define MOUNT_ATTR_RDONLY ...
    #define MOUNT_ATTR_NOSUID ...
    #define MOUNT_ATTR_NODEV ...
    #define RESOLVE_NO_XDEV ...
    #define RESOLVE_NO_MAGICLINKS ...
    #define RESOLVE_NO_SYMLINKS ...
    #define RESOLVE_BENEATH ...
    #define RESOLVE_IN_ROOT ...
    #define MNT_DETACH ...
    #define CLONE_NEWUSER ...
    #define CLONE_NEWNET ...
    #define MS_BIND ...
    #define MS_REC ...
    #define MS_PRIVATE ...
    """
)

ffibuilder.set_source(
    "runtime._syscalls",
    """
    #include <sched.h>
    #include <stdint.h>
    #include <fcntl.h>
    #include <unistd.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>
    #include <sys/syscall.h>

    #ifndef OPEN_TREE_CLONE
    #define OPEN_TREE_CLONE 1
    #endif
    #ifndef OPEN_TREE_CLOEXEC
    #define OPEN_TREE_CLOEXEC O_CLOEXEC
    #endif
    #ifndef AT_RECURSIVE
    #define AT_RECURSIVE 0x8000
    #endif
    #ifndef MOVE_MOUNT_F_EMPTY_PATH
    #define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
    #endif
    #ifndef MOUNT_ATTR_IDMAP  /* glibc < 2.36 lacks the new mount API */
    #define MOUNT_ATTR_IDMAP 0x00100000
    struct mount_attr {
        uint64_t attr_set;
        uint64_t attr_clr;
        uint64_t propagation;
        uint64_t userns_fd;
    };
    #endif
    #ifndef RESOLVE_IN_ROOT  /* <linux/openat2.h>, not included: its struct clashes */
    #define RESOLVE_NO_XDEV 0x01
    #define RESOLVE_NO_MAGICLINKS 0x02
    #define RESOLVE_NO_SYMLINKS 0x04
    #define RESOLVE_BENEATH 0x08
    #define RESOLVE_IN_ROOT 0x10
    #endif
    #ifndef MOUNT_ATTR_RDONLY
    #define MOUNT_ATTR_RDONLY 0x00000001
    #define MOUNT_ATTR_NOSUID 0x00000002
    #define MOUNT_ATTR_NODEV 0x00000004
    #endif
    #ifndef SYS_openat2
    #define SYS_openat2 437
    #endif
    #ifndef SYS_open_tree
    #define SYS_open_tree 428
    #endif
    #ifndef SYS_move_mount
    #define SYS_move_mount 429
    #endif
    #ifndef SYS_mount_setattr
    #define SYS_mount_setattr 442
    #endif

    static int hostd_open_tree(int dfd, const char *path, unsigned int flags) {
        return (int)syscall(SYS_open_tree, dfd, path, flags);
    }
    static int hostd_mount_setattr(int dfd, const char *path, unsigned int flags,
                                   struct mount_attr *attr, size_t size) {
        return (int)syscall(SYS_mount_setattr, dfd, path, flags, attr, size);
    }
    static int hostd_move_mount(int from_dfd, const char *from_path, int to_dfd,
                                const char *to_path, unsigned int flags) {
        return (int)syscall(SYS_move_mount, from_dfd, from_path, to_dfd, to_path, flags);
    }
    static int hostd_openat2(int dfd, const char *path, uint64_t flags, uint64_t mode,
                             uint64_t resolve) {
        uint64_t how[3] = {flags, mode, resolve};  /* struct open_how */
        return (int)syscall(SYS_openat2, dfd, path, how, sizeof(how));
    }
    static int hostd_set_child_subreaper(void) {
        return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
