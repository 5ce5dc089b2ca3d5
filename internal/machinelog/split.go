package machinelog

import "bytes"

// split cuts partial+data into complete lines, without their "\n" (or
// "\r\n"), and returns what is left after the last newline. A line longer
// than maxLen is cut into pieces of maxLen bytes.
func split(partial, data []byte, maxLen int) (lines []string, rest []byte) {
	buf := data
	if len(partial) > 0 {
		buf = append(partial, data...)
	}
	for {
		i := bytes.IndexByte(buf, '\n')
		if i < 0 {
			break
		}
		line := buf[:i]
		for len(line) > maxLen {
			lines = append(lines, string(line[:maxLen]))
			line = line[maxLen:]
		}
		lines = append(lines, string(bytes.TrimSuffix(line, []byte{'\r'})))
		buf = buf[i+1:]
	}
	for len(buf) > maxLen {
		lines = append(lines, string(buf[:maxLen]))
		buf = buf[maxLen:]
	}
	// Copy: buf may alias the caller's read buffer.
	return lines, append([]byte(nil), buf...)
}
