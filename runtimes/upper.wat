;; upper: standard input to standard output with ASCII letters in upper case.
;; Escapes are kept as they are, so JSON stays JSON: {"payload": ["hi\n"]} -> {"PAYLOAD": ["HI\n"]}.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; Memory: an iovec at 0 (pointer, length), a byte count at 8, the data from 1024.

  ;; Read all of stdin to address 1024, growing memory as needed; returns its length.
  (func $read_all (result i32)
    (local $len i32) (local $n i32)
    (block $done
      (loop $more
        ;; keep at least 64 KiB free after the data
        (if (i32.lt_u (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.add (i32.const 1024) (local.get $len)))
                      (i32.const 65536))
          (then (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))))
        (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $len)))
        (i32.store (i32.const 4) (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.add (i32.const 1024) (local.get $len))))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $len (i32.add (local.get $len) (local.get $n)))
        (br $more)))
    (local.get $len))

  ;; Write len bytes from ptr to stdout.
  (func $write_all (param $ptr i32) (param $len i32)
    (local $n i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $n)))
        (local.set $len (i32.sub (local.get $len) (local.get $n)))
        (br $more))))

  (func (export "_start")
    (local $len i32) (local $i i32) (local $c i32) (local $escaped i32)
    (local.set $len (call $read_all))
    (local.set $i (i32.const 1024))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.add (i32.const 1024) (local.get $len))))
        (local.set $c (i32.load8_u (local.get $i)))
        (if (local.get $escaped)
          (then (local.set $escaped (i32.const 0)))
          (else
            (if (i32.eq (local.get $c) (i32.const 92))  ;; backslash: keep the next byte
              (then (local.set $escaped (i32.const 1)))
              (else
                (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
                  (then (i32.store8 (local.get $i) (i32.sub (local.get $c) (i32.const 32)))))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $write_all (i32.const 1024) (local.get $len))))
