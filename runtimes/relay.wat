;; relay: copies every message it reads on channel "in" to channel "out", until
;; it reads "quit". An orchestrator module for channels: give it
;;   "channels": [{"path": "in", "mode": "r", "topic": "realm/in"},
;;                {"path": "out", "mode": "w", "topic": "realm/out"}]
;; It prints "ready" once both are open. Exit codes: 3 a channel is missing,
;; 4 a read failed (stopped), 5 a message longer than 64 KiB.
(module
  (import "channels" "open" (func $open (param i32 i32) (result i32)))
  (import "channels" "read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "channels" "write" (func $write (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)
  ;; an iovec at 0, the written count at 8, names at 16.., the message buffer at 1024 (64 KiB)
  (data (i32.const 16) "in")
  (data (i32.const 24) "out")
  (data (i32.const 32) "quit")
  (data (i32.const 48) "ready\n")

  (func $say (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (local $in i32) (local $out i32) (local $n i32)
    (local.set $in (call $open (i32.const 16) (i32.const 2)))
    (local.set $out (call $open (i32.const 24) (i32.const 3)))
    (if (i32.or (i32.lt_s (local.get $in) (i32.const 0)) (i32.lt_s (local.get $out) (i32.const 0)))
      (then (call $exit (i32.const 3))))
    (call $say (i32.const 48) (i32.const 6))
    (loop $next
      ;; wait as long as it takes for the next message
      (local.set $n (call $read (local.get $in) (i32.const 1024) (i32.const 65536) (i32.const -1)))
      (if (i32.lt_s (local.get $n) (i32.const 0)) (then (call $exit (i32.const 4))))
      (if (i32.gt_s (local.get $n) (i32.const 65536)) (then (call $exit (i32.const 5))))
      (if (i32.and (i32.eq (local.get $n) (i32.const 4))
                   (i32.eq (i32.load (i32.const 1024)) (i32.load (i32.const 32))))
        (then (return)))
      (drop (call $write (local.get $out) (i32.const 1024) (local.get $n)))
      (br $next))))
