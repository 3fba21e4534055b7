import { createHash } from 'node:crypto'

/** The namespace that keeps our keys apart from an app's own advisory locks. */
export const LOCK_KEY_PREFIX = 'pgsingleton:'

/**
 * The 64-bit advisory-lock key of a singleton: the first 8 bytes of
 * sha256('pgsingleton:' + name), read as a signed big-endian integer. The same as the
 * SQL function `pgsingleton.lock_key(name)`:
 *
 *   SELECT ('x' || left(encode(sha256(convert_to('pgsingleton:' || name, 'UTF8')), 'hex'), 16))::bit(64)::bigint
 *
 * The lock session locks through the SQL function, so the two cannot drift apart in
 * use; this copy is for users who want the key without a query (a test holds them equal).
 */
export function lockKey(name: string): bigint {
  return createHash('sha256')
    .update(LOCK_KEY_PREFIX + name, 'utf8')
    .digest()
    .readBigInt64BE(0)
}
