;; counter: prints "count 000001", "count 000002", ... every 200 ms and ends
;; after a million. Its count lives in memory (the digits it prints) and in a
;; global it does not export: a module to try moving with its state
;; (python -m runtime_manager migrate --module counter --to node2): the count
;; goes on where it was, on the other node.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  ;; the line at 16 (13 bytes, digits at 22..27); an iovec at 0; a clock
  ;; subscription at 64 (clock id at 80, timeout at 88); its event at 128
  (data (i32.const 16) "count 000000\n")

  (func $increment  ;; the digits at 22..27, plus one
    (local $i i32) (local $d i32)
    (local.set $i (i32.const 27))
    (block $done
      (loop $carry
        (local.set $d (i32.add (i32.load8_u (local.get $i)) (i32.const 1)))
        (if (i32.le_u (local.get $d) (i32.const 57))
          (then (i32.store8 (local.get $i) (local.get $d)) (br $done)))
        (i32.store8 (local.get $i) (i32.const 48))
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (br_if $carry (i32.ge_u (local.get $i) (i32.const 22))))))

  (func (export "_start")
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const 200000000))
    (loop $forever
      (global.set $n (i32.add (global.get $n) (i32.const 1)))
      (call $increment)
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (i32.const 13))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (drop (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 12)))
      (br_if $forever (i32.lt_u (global.get $n) (i32.const 1000000))))))
