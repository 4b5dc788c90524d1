;; cat: prints the file named by its first argument, from the first preopened
;; directory (args.dirs). For orchestrator tests of args.dirs; exits 2 when the
;; file cannot be opened (no directory, or a path outside it).
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)

  ;; Memory: iovec at 0, counts at 16/20, opened fd at 24, argv pointers at 1024,
  ;; argv strings at 4096, file data at 16384.
  (func (export "_start")
    (local $name i32) (local $len i32) (local $fd i32) (local $n i32)
    (drop (call $args_sizes (i32.const 16) (i32.const 20)))
    (if (i32.lt_u (i32.load (i32.const 16)) (i32.const 2)) (then (call $exit (i32.const 2))))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (local.set $name (i32.load (i32.const 1028)))
    (block $end (loop $scan
      (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $name) (local.get $len)))))
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (br $scan)))
    ;; path_open(dirfd 3, lookupflags 0, path, len, oflags 0, rights: fd_read (2), inheriting 0, fdflags 0, &fd)
    (if (call $path_open (i32.const 3) (i32.const 0) (local.get $name) (local.get $len) (i32.const 0)
                         (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 24))
      (then (call $exit (i32.const 2))))
    (local.set $fd (i32.load (i32.const 24)))
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.const 16384))
      (i32.store (i32.const 4) (i32.const 65536))
      (br_if $done (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (br_if $done (i32.eqz (local.get $n)))
      (i32.store (i32.const 4) (local.get $n))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $more)))))
