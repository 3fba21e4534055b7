/** The subset of pino's interface pg-singleton calls: `logger.info({ fields }, 'message')`. */
export interface Logger {
  debug(fields: object, message: string): void
  info(fields: object, message: string): void
  warn(fields: object, message: string): void
  error(fields: object, message: string): void
}

const ignore = () => {}

/** The library default: a library says nothing unless its host app asks it to. */
export const silentLogger: Logger = { debug: ignore, info: ignore, warn: ignore, error: ignore }

/** The CLI's default: one readable line per event on stderr. */
export function consoleLogger(nodeId: string, debug = false): Logger {
  const write = (level: string) => (fields: object, message: string) => {
    const extra = Object.entries(fields)
      .map(
        ([key, value]) =>
          `${key}=${value instanceof Error ? JSON.stringify(value.message) : JSON.stringify(value)}`,
      )
      .join(' ')
    process.stderr.write(
      `${new Date().toISOString()} ${level} [${nodeId}] ${message}${extra ? ` ${extra}` : ''}\n`,
    )
  }
  return {
    debug: debug ? write('DEBUG') : ignore,
    info: write('INFO '),
    warn: write('WARN '),
    error: write('ERROR'),
  }
}
