package main

import (
	"context"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// switchFS is a FUSE filesystem that passes everything through to a folder,
// except that while readOnly is set it refuses every change with EROFS, the
// error a disk remounted read-only gives. Unlike a real filesystem it can be
// made writable again under open files, so a test can watch the server
// come back. (The kernel refuses "remount,ro" while files are open for
// writing, and ext4's errors=remount-ro lasts until unmount.)
type switchFS struct {
	readOnly atomic.Bool
	refused  atomic.Int64 // changes refused so far
}

// refuse reports whether a change is refused now, and counts it if so.
func (s *switchFS) refuse() bool {
	if s.readOnly.Load() {
		s.refused.Add(1)
		return true
	}
	return false
}

// mountSwitchFS mounts a switchFS over a new folder and returns the mount
// point; it unmounts when the test ends, and skips the test when FUSE is
// not available (not root, or no /dev/fuse).
func mountSwitchFS(t *testing.T) (string, *switchFS) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a FUSE filesystem")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("no FUSE here: %v", err)
	}
	backing, dir := t.TempDir(), t.TempDir()
	s := &switchFS{}
	root := &fs.LoopbackRoot{Path: backing}
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		t.Fatal(err)
	}
	root.Dev = uint64(st.Dev)
	root.RootNode = &switchNode{LoopbackNode: &fs.LoopbackNode{RootData: root}, fs: s}
	timeout := time.Duration(0) // no attribute caching: every size the server sees is current
	server, err := fs.Mount(dir, root.RootNode, &fs.Options{
		EntryTimeout: &timeout, AttrTimeout: &timeout, NegativeTimeout: &timeout,
		MountOptions: fuse.MountOptions{DirectMountStrict: true, FsName: "corral-switchfs", Name: "switchfs"},
	})
	if err != nil {
		t.Skipf("cannot mount FUSE here: %v", err)
	}
	// Registered before the server starts, so it runs after the server stopped.
	t.Cleanup(func() {
		if err := server.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir, s
}

// switchNode is a loopback node that asks its switchFS before a change.
type switchNode struct {
	*fs.LoopbackNode
	fs *switchFS
}

func (n *switchNode) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &switchNode{LoopbackNode: ops.(*fs.LoopbackNode), fs: n.fs}
}

func (n *switchNode) wrap(fh fs.FileHandle) fs.FileHandle {
	if lf, ok := fh.(*fs.LoopbackFile); ok {
		return &switchFile{LoopbackFile: lf, fs: n.fs}
	}
	return fh
}

func (n *switchNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 && n.fs.refuse() {
		return nil, 0, syscall.EROFS
	}
	fh, fuseFlags, errno := n.LoopbackNode.Open(ctx, flags)
	return n.wrap(fh), fuseFlags, errno
}

func (n *switchNode) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if n.fs.refuse() {
		return nil, nil, 0, syscall.EROFS
	}
	ino, fh, fuseFlags, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	return ino, n.wrap(fh), fuseFlags, errno
}

func (n *switchNode) Unlink(ctx context.Context, name string) syscall.Errno {
	if n.fs.refuse() {
		return syscall.EROFS
	}
	return n.LoopbackNode.Unlink(ctx, name)
}

func (n *switchNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if n.fs.refuse() {
		return syscall.EROFS
	}
	if sf, ok := f.(*switchFile); ok {
		f = sf.LoopbackFile
	}
	return n.LoopbackNode.Setattr(ctx, f, in, out)
}

// switchFile is an open loopback file that asks its switchFS before a
// write. It never hands its descriptor to the kernel (FUSE passthrough),
// so every write comes here.
type switchFile struct {
	*fs.LoopbackFile
	fs *switchFS
}

func (f *switchFile) PassthroughFd() (int, bool) { return 0, false }

func (f *switchFile) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if f.fs.refuse() {
		return 0, syscall.EROFS
	}
	return f.LoopbackFile.Write(ctx, data, off)
}

func (f *switchFile) Writev(ctx context.Context, data [][]byte, off int64) (uint32, syscall.Errno) {
	if f.fs.refuse() {
		return 0, syscall.EROFS
	}
	return f.LoopbackFile.Writev(ctx, data, off)
}

func (f *switchFile) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	if f.fs.refuse() {
		return syscall.EROFS
	}
	return f.LoopbackFile.Allocate(ctx, off, size, mode)
}

func (f *switchFile) Setattr(ctx context.Context, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if f.fs.refuse() {
		return syscall.EROFS
	}
	return f.LoopbackFile.Setattr(ctx, in, out)
}
