;; sum: adds up the numbers in the JSON on standard input and writes {"sum": N}.
;; Numbers inside strings are skipped; the fraction and exponent of a number are
;; ignored (whole numbers are summed, as 64-bit integers).
;; {"payload": [1, 2, [3, "4"], {"x": -10}]} -> {"sum": -4}
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

  (func $is_digit (param $c i32) (result i32)
    (i32.and (i32.ge_u (local.get $c) (i32.const 48)) (i32.le_u (local.get $c) (i32.const 57))))

  (func (export "_start")
    (local $end i32) (local $i i32) (local $c i32) (local $in_string i32) (local $escaped i32)
    (local $sum i64) (local $num i64) (local $neg i32) (local $p i32) (local $v i64)
    (local.set $end (i32.add (i32.const 1024) (call $read_all)))
    (local.set $i (i32.const 1024))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $i)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (if (local.get $in_string)
          (then
            (if (local.get $escaped)
              (then (local.set $escaped (i32.const 0)))
              (else
                (if (i32.eq (local.get $c) (i32.const 92)) (then (local.set $escaped (i32.const 1))))
                (if (i32.eq (local.get $c) (i32.const 34)) (then (local.set $in_string (i32.const 0)))))))
          (else
            (if (i32.eq (local.get $c) (i32.const 34)) (then (local.set $in_string (i32.const 1))))
            (if (i32.or (call $is_digit (local.get $c)) (i32.eq (local.get $c) (i32.const 45)))
              (then
                (local.set $neg (i32.eq (local.get $c) (i32.const 45)))
                (local.set $num (if (result i64) (local.get $neg) (then (i64.const 0))
                                  (else (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48))))))
                ;; the rest of the whole part
                (block $whole_done
                  (loop $whole
                    (br_if $whole_done (i32.ge_u (local.get $i) (local.get $end)))
                    (local.set $c (i32.load8_u (local.get $i)))
                    (br_if $whole_done (i32.eqz (call $is_digit (local.get $c))))
                    (local.set $num (i64.add (i64.mul (local.get $num) (i64.const 10))
                                             (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br $whole)))
                ;; skip a fraction and an exponent: digits . e E + -
                (block $rest_done
                  (loop $rest
                    (br_if $rest_done (i32.ge_u (local.get $i) (local.get $end)))
                    (local.set $c (i32.load8_u (local.get $i)))
                    (br_if $rest_done
                      (i32.eqz (i32.or (call $is_digit (local.get $c))
                               (i32.or (i32.or (i32.eq (local.get $c) (i32.const 46)) (i32.eq (i32.or (local.get $c) (i32.const 32)) (i32.const 101)))
                                       (i32.or (i32.eq (local.get $c) (i32.const 43)) (i32.eq (local.get $c) (i32.const 45)))))))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br $rest)))
                (local.set $sum (if (result i64) (local.get $neg)
                                  (then (i64.sub (local.get $sum) (local.get $num)))
                                  (else (i64.add (local.get $sum) (local.get $num)))))))))
        (br $next)))
    ;; write {"sum": N}: digits backwards from 1000 down, the prefix before them
    (local.set $p (i32.const 1000))
    (i32.store8 (local.get $p) (i32.const 125))  ;; }
    (local.set $v (if (result i64) (i64.lt_s (local.get $sum) (i64.const 0))
                    (then (i64.sub (i64.const 0) (local.get $sum))) (else (local.get $sum))))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (if (i64.lt_s (local.get $sum) (i64.const 0))
      (then (local.set $p (i32.sub (local.get $p) (i32.const 1))) (i32.store8 (local.get $p) (i32.const 45))))
    (local.set $p (i32.sub (local.get $p) (i32.const 8)))
    (i64.store (local.get $p) (i64.const 0x203a226d7573227b))  ;; the 8 bytes {"sum":  (then a space)
    (call $write_all (local.get $p) (i32.sub (i32.const 1001) (local.get $p)))))
