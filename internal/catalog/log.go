package catalog

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
)

// serverLogger hands the embedded NATS server's log lines to slog. The
// server's notices and warnings are routine (startup, peers coming and
// going, elections) and go out at debug; its errors keep their level. It
// remembers the last fatal error, which the server logs instead of
// returning.
type serverLogger struct {
	l *slog.Logger

	mu    sync.Mutex
	fatal string
}

func (s *serverLogger) lastFatal() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fatal
}

func (s *serverLogger) log(level slog.Level, format string, v []any) {
	ctx := context.Background()
	if !s.l.Enabled(ctx, level) {
		return
	}
	s.l.Log(ctx, level, fmt.Sprintf(format, v...))
}

func (s *serverLogger) Noticef(format string, v ...any) { s.log(slog.LevelDebug, format, v) }
func (s *serverLogger) Warnf(format string, v ...any)   { s.log(slog.LevelDebug, format, v) }
func (s *serverLogger) Errorf(format string, v ...any)  { s.log(slog.LevelError, format, v) }
func (s *serverLogger) Debugf(format string, v ...any)  { s.log(slog.LevelDebug, format, v) }
func (s *serverLogger) Tracef(format string, v ...any)  { s.log(slog.LevelDebug, format, v) }

func (s *serverLogger) Fatalf(format string, v ...any) {
	s.mu.Lock()
	s.fatal = fmt.Sprintf(format, v...)
	s.mu.Unlock()
	s.log(slog.LevelError, format, v)
}
