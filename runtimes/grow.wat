;; grow: asks for memory until it is refused, then traps. For tests: the
;; memory limit (limits.memory_mb) makes memory.grow fail.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))
