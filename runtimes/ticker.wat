;; ticker: prints "tick" every 50 ms, forever. For orchestrator tests: its
;; output streams while it runs, and a delete (or args.limit) stops it.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "tick\n")

  ;; Memory: iovec at 0, written count at 8, a clock subscription at 64 (48 bytes),
  ;; the event at 128, the event count at 192, the text at 200.
  (func (export "_start")
    (i64.store (i32.const 64) (i64.const 0))          ;; userdata
    (i32.store8 (i32.const 72) (i32.const 0))         ;; tag: clock
    (i32.store (i32.const 80) (i32.const 1))          ;; clock id: monotonic
    (i64.store (i32.const 88) (i64.const 50000000))   ;; timeout: 50 ms in ns
    (i64.store (i32.const 96) (i64.const 1000000))    ;; precision
    (i32.store16 (i32.const 104) (i32.const 0))       ;; flags: relative
    (loop $forever
      (i32.store (i32.const 0) (i32.const 200))
      (i32.store (i32.const 4) (i32.const 5))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (drop (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 192)))
      (br $forever))))
