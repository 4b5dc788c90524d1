;; loop: never ends. For tests: a step's time limit (limits.timeout_ms) stops it.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever (br $forever))))
